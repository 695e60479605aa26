# shellcheck shell=bash
# Install and check Debian packages from the one table, scripts/deps.tsv. Sourced by the installers
# (scripts/install-deps.sh, scripts/testbed/install-libvirt.sh, scripts/ceph/install-ceph.sh):
#
#   deps_install GROUP...   install what the groups' rows lack, then check every row (exit 1 if not)
#   deps_missing GROUP...   print "package suite" of each row that is not satisfied (nothing: all there)
#   deps_checks GROUP...    print the `check` column of the groups' rows (commands and paths)
#
# A row is satisfied when its check is present (a command on PATH, an existing path, or for `-`
# the package installed per dpkg) and, with a `min`, the installed package's upstream major version
# is at least that. Because install and check read the same rows, a check without an install
# cannot happen.

DEPS_TABLE=${DEPS_TABLE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deps.tsv}
DEPS_APT=(apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef
          -o Dpkg::Options::=--force-confold)

deps_log() { echo "deps: $*" >&2; }

# deps_rows GROUP...: the table's rows of these groups, as "check package suite min group".
deps_rows() {
  local want=" $* "
  awk -v want="$want" '!/^[[:space:]]*(#|$)/ && index(want, " " $5 " ") { print $1, $2, $3, $4, $5 }' "$DEPS_TABLE"
}

deps_major() { # package: upstream major version installed, or 0
  local v
  v=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null || true)
  [[ $v == ii* ]] || { echo 0; return; }
  v=${v##* }; v=${v#*:}; v=${v%%[.+~-]*}
  [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0
}

deps_row_ok() { # check package min
  local check=$1 pkg=$2 min=$3
  case $check in
    -) dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii' || return 1 ;;
    /*) [[ -e $check ]] || return 1 ;;
    *) command -v "$check" >/dev/null 2>&1 || return 1 ;;
  esac
  [[ $min == - ]] || (( $(deps_major "$pkg") >= min ))
}

deps_missing() {
  local check pkg suite min
  while read -r check pkg suite min _; do
    deps_row_ok "$check" "$pkg" "$min" || echo "$pkg $suite"
  done < <(deps_rows "$@") | sort -u
}

deps_checks() {
  deps_rows "$@" | awk '$1 != "-" { print $1 }' | sort -u
}

# The release's backports suite in apt's sources, if the table wants one and it is absent.
deps_add_backports() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [[ -n $codename ]] || { deps_log "cannot tell the Debian release (/etc/os-release)"; return 1; }
  grep -rqs -- "$codename-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
  deps_log "adding $codename-backports to apt sources"
  cat > "/etc/apt/sources.list.d/$codename-backports.sources" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  DEPS_NEED_UPDATE=1
}

deps_install() {
  local missing pkg suite codename
  missing=$(deps_missing "$@")
  if [[ -z $missing ]]; then
    return 0
  fi
  (( EUID == 0 )) || { deps_log "must run as root to install: $(echo "$missing" | awk '{print $1}' | xargs)"; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  local -a main_pkgs=() bp_pkgs=()
  while read -r pkg suite; do
    if [[ $suite == backports ]]; then bp_pkgs+=("$pkg"); else main_pkgs+=("$pkg"); fi
  done <<< "$missing"
  DEPS_NEED_UPDATE=${DEPS_NEED_UPDATE:-0}
  if (( ${#bp_pkgs[@]} )); then
    deps_add_backports
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    # apt must know the suite's packages: update if no list of it was fetched yet.
    compgen -G "/var/lib/apt/lists/*_dists_${codename}-backports_*Packages*" >/dev/null || DEPS_NEED_UPDATE=1
  fi
  # A fresh machine may have no package lists at all.
  compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null || DEPS_NEED_UPDATE=1
  if (( DEPS_NEED_UPDATE )); then
    deps_log "apt-get update"
    "${DEPS_APT[@]}" update -qq
    DEPS_NEED_UPDATE=0
  fi
  # Backports first, each named as PKG/SUITE: apt takes that package from backports and a
  # dependency from there only where the release's own version does not satisfy it. (`-t`
  # would take every new dependency from backports: on a bare root that pulled libelf1 0.192,
  # which then blocked ceph's libdw1 0.188.) The rest comes from the release in a second call.
  if (( ${#bp_pkgs[@]} )); then
    deps_log "installing from $codename-backports: ${bp_pkgs[*]}"
    deps_apt_install "${bp_pkgs[@]/%//$codename-backports}"
  fi
  if (( ${#main_pkgs[@]} )); then
    deps_log "installing: ${main_pkgs[*]}"
    deps_apt_install "${main_pkgs[@]}"
  fi
  missing=$(deps_missing "$@")
  if [[ -n $missing ]]; then
    deps_log "still missing after install (package suite): $(echo "$missing" | xargs)"
    return 1
  fi
}

# apt-get install, quiet on success; on failure the tail of its output. A stale package list
# (a mirror that moved on) gets one `apt-get update` and a second try.
deps_apt_install() {
  local log
  log=$(mktemp /tmp/snapfs-apt.XXXXXX)
  if ! "${DEPS_APT[@]}" install -y -q --no-install-recommends "$@" >"$log" 2>&1; then
    deps_log "apt-get install failed; updating the package lists and trying once more"
    if ! { "${DEPS_APT[@]}" update -qq && "${DEPS_APT[@]}" install -y -q --no-install-recommends "$@"; } >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      rm -f "$log"
      return 1
    fi
  fi
  rm -f "$log"
}
