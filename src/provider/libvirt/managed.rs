//! Which domains a cloud manages (OpenStack Nova, Apache CloudStack, oVirt/VDSM, or home-made
//! tooling named by `--managed-match`). On such a host libvirt is not the source of truth: the
//! cloud redefines the domain from its own database (Nova's hard reboot, CloudStack's
//! transient domains), so a snapshot must change nothing lasting on the domain (see
//! `store.rs`, the copy method).
//!
//! [`RULES`] is the one detection table; docs/libvirt.md shows the same table (a unit test
//! checks that every rule's text is there).

use serde_json::{json, Value};

use super::xml;
use crate::error::{Error, Result};

/// What a rule looks at.
#[derive(Clone, Copy, Debug)]
pub enum Match {
    /// An element of `<metadata>` in this XML namespace.
    MetadataNs(&'static str),
    /// The domain name, by a parser that returns the ids the name carries.
    Name(fn(&str) -> Option<Value>),
    /// `<sysinfo type='smbios'><system>` entries (manufacturer, product).
    Smbios(&'static str, &'static str),
}

/// One row of the detection table.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub system: &'static str,
    pub matches: Match,
    /// The rule as docs/libvirt.md states it.
    pub doc: &'static str,
}

pub const NOVA_NS_1_1: &str = "http://openstack.org/xmlns/libvirt/nova/1.1";
pub const NOVA_NS_1_0: &str = "http://openstack.org/xmlns/libvirt/nova/1.0";
pub const OVIRT_NS: &str = "http://ovirt.org/vm/1.0";

/// The detection table, checked in order; the first rule that matches names the system.
pub const RULES: &[Rule] = &[
    Rule {
        system: "nova",
        matches: Match::MetadataNs(NOVA_NS_1_1),
        doc: "`<metadata>` element in namespace `http://openstack.org/xmlns/libvirt/nova/1.1`",
    },
    Rule {
        system: "nova",
        matches: Match::MetadataNs(NOVA_NS_1_0),
        doc: "`<metadata>` element in namespace `http://openstack.org/xmlns/libvirt/nova/1.0`",
    },
    Rule {
        system: "ovirt",
        matches: Match::MetadataNs(OVIRT_NS),
        doc: "`<metadata>` element in namespace `http://ovirt.org/vm/1.0`",
    },
    Rule {
        system: "cloudstack",
        matches: Match::Name(cloudstack_name),
        doc: "domain name `i-<account>-<id>-VM`, `r-<id>-VM`, `s-<id>-VM` or `v-<id>-VM`",
    },
    Rule {
        system: "cloudstack",
        matches: Match::Smbios("Apache Software Foundation", "CloudStack KVM Hypervisor"),
        doc: "SMBIOS `<sysinfo>` manufacturer `Apache Software Foundation`, product `CloudStack KVM Hypervisor`",
    },
];

/// `--managed`: whether the table is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagedMode {
    /// The table and `--managed-match`.
    Auto,
    /// No domain is managed (the table is ignored).
    Never,
    /// Every domain is managed.
    Always,
}

choice_from_str!(ManagedMode {
    "auto" => ManagedMode::Auto,
    "never" => ManagedMode::Never,
    "always" => ManagedMode::Always,
});

/// `--managed` with `--managed-match`.
#[derive(Clone, Debug)]
pub struct ManagedPolicy {
    pub mode: ManagedMode,
    /// A regular expression on domain names (unanchored: use `^…$`).
    pub custom: Option<(String, regex_automata::meta::Regex)>,
}

impl Default for ManagedPolicy {
    fn default() -> Self {
        ManagedPolicy {
            mode: ManagedMode::Auto,
            custom: None,
        }
    }
}

impl ManagedPolicy {
    pub fn new(mode: ManagedMode, pattern: Option<&str>) -> Result<ManagedPolicy> {
        let custom = match pattern {
            Some(p) => Some((
                p.to_string(),
                regex_automata::meta::Regex::new(p)
                    .map_err(|e| Error::Invalid(format!("--managed-match {p:?}: {e}")))?,
            )),
            None => None,
        };
        Ok(ManagedPolicy { mode, custom })
    }

    /// `managed_by` of a domain (its XML, any flags), or None when it is not managed.
    pub fn detect(&self, domain_xml: &str) -> Result<Option<Value>> {
        if self.mode == ManagedMode::Never {
            return Ok(None);
        }
        let doc = roxmltree::Document::parse(domain_xml)
            .map_err(|e| Error::Backend(format!("libvirt XML: {e}")))?;
        let root = doc.root_element();
        let name = xml::child_text(root, "name").unwrap_or_default();
        let uuid = xml::child_text(root, "uuid").unwrap_or_default();
        for rule in RULES {
            if let Some(v) = apply(rule, root, &name, &uuid) {
                return Ok(Some(v));
            }
        }
        if let Some((p, re)) = &self.custom {
            if re.is_match(name.as_str()) {
                return Ok(Some(json!({
                    "system": "custom",
                    "rule": format!("--managed-match {p}"),
                    "id": uuid,
                    "name": name,
                })));
            }
        }
        if self.mode == ManagedMode::Always {
            return Ok(Some(json!({
                "system": "unknown",
                "rule": "--managed=always",
                "id": uuid,
                "name": name,
            })));
        }
        Ok(None)
    }
}

fn apply(rule: &Rule, root: roxmltree::Node<'_, '_>, name: &str, uuid: &str) -> Option<Value> {
    let rule_json = json!(rule.doc.replace('`', ""));
    let mut v = match rule.matches {
        Match::MetadataNs(ns) => {
            let el = xml::child(root, "metadata")?
                .children()
                .find(|m| m.is_element() && m.tag_name().namespace() == Some(ns))?;
            match rule.system {
                "nova" => nova(el, uuid),
                _ => json!({ "id": uuid, "name": name }),
            }
        }
        Match::Name(parse) => {
            let mut ids = parse(name)?;
            ids["name"] = json!(name);
            ids
        }
        Match::Smbios(manufacturer, product) => {
            let sys = root
                .children()
                .filter(|c| c.has_tag_name("sysinfo") && c.attribute("type") == Some("smbios"))
                .find_map(|s| xml::child(s, "system"))?;
            let entry = |n: &str| {
                sys.children()
                    .find(|e| e.has_tag_name("entry") && e.attribute("name") == Some(n))
                    .and_then(|e| e.text())
                    .map(str::trim)
            };
            if entry("manufacturer") != Some(manufacturer) || entry("product") != Some(product) {
                return None;
            }
            let mut ids = cloudstack_name(name).unwrap_or_else(|| json!({}));
            ids["name"] = json!(name);
            ids
        }
    };
    v["system"] = json!(rule.system);
    v["rule"] = rule_json;
    Some(v)
}

/// `<nova:instance>`: the instance's name, owner, flavor and creation time.
fn nova(el: roxmltree::Node<'_, '_>, uuid: &str) -> Value {
    let text = |n: roxmltree::Node<'_, '_>, tag: &str| xml::child_text(n, tag);
    let owner = xml::child(el, "owner");
    let who = |tag: &str| {
        owner.and_then(|o| xml::child(o, tag)).map(|n| {
            json!({
                "uuid": n.attribute("uuid"),
                "name": n.text().map(str::trim),
            })
        })
    };
    let flavor = xml::child(el, "flavor").map(|f| {
        let num = |tag: &str| text(f, tag).and_then(|t| t.trim().parse::<u64>().ok());
        json!({
            "name": f.attribute("name"),
            "memory_mib": num("memory"),
            "disk_gib": num("disk"),
            "vcpus": num("vcpus"),
        })
    });
    json!({
        "id": uuid,
        "name": text(el, "name"),
        "project": who("project"),
        "user": who("user"),
        "flavor": flavor,
        "created": text(el, "creationTime"),
        "version": el.tag_name().namespace().and_then(|n| n.rsplit('/').next()),
    })
}

/// CloudStack's names: `i-<account>-<id>-VM` (user VM), `r-<id>-VM` (virtual router),
/// `s-<id>-VM` (secondary storage VM), `v-<id>-VM` (console proxy).
pub fn cloudstack_name(name: &str) -> Option<Value> {
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let body = name.strip_suffix("-VM")?;
    let parts: Vec<&str> = body.split('-').collect();
    match parts.as_slice() {
        ["i", account, id] => Some(json!({
            "kind": "user",
            "account_id": num(account)?,
            "vm_id": num(id)?,
        })),
        [k @ ("r" | "s" | "v"), id] => Some(json!({
            "kind": match *k {
                "r" => "router",
                "s" => "secondary-storage",
                _ => "console-proxy",
            },
            "vm_id": num(id)?,
        })),
        _ => None,
    }
}

/// A name a launched (unmanaged) domain must not have: one the clouds of [`RULES`] use for
/// their own domains (`instance-*` is Nova's `instance-%08x`, which Nova may reap as a
/// deleted instance; `i-*-*-VM` and the system VM names are CloudStack's).
pub fn refuse_cloud_name(name: &str) -> Result<()> {
    if name.starts_with("instance-") || cloudstack_name(name).is_some() {
        return Err(Error::Invalid(format!(
            "{name:?} looks like a cloud-managed domain name (instance-*, i-*-*-VM): choose another"
        )));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("i-") && lower.ends_with("-vm") && lower.matches('-').count() >= 3 {
        return Err(Error::Invalid(format!(
            "{name:?} looks like a CloudStack domain name (i-*-*-VM): choose another"
        )));
    }
    Ok(())
}

/// Whether a `<metadata>` child belongs to a cloud of [`RULES`] (stripped from a launch).
pub fn is_cloud_metadata_ns(ns: Option<&str>) -> bool {
    RULES
        .iter()
        .any(|r| matches!(r.matches, Match::MetadataNs(n) if Some(n) == ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `<nova:instance>` as Nova 27 writes it (shared with tests/libvirt_managed.rs).
    const NOVA_INSTANCE: &str = include_str!("../../../tests/data/nova-instance-1.1.xml");

    fn nova() -> String {
        format!(
            "<domain type='kvm'><name>instance-0000002a</name>\
             <uuid>5d2f6a2e-8c5b-4b8e-9a8b-6b0c1d2e3f40</uuid>\
             <metadata>{NOVA_INSTANCE}</metadata><devices/></domain>"
        )
    }

    #[test]
    fn nova_1_1() {
        let v = ManagedPolicy::default().detect(&nova()).unwrap().unwrap();
        assert_eq!(v["system"], "nova");
        assert_eq!(v["id"], "5d2f6a2e-8c5b-4b8e-9a8b-6b0c1d2e3f40");
        assert_eq!(v["name"], "web-1");
        assert_eq!(v["project"]["name"], "web");
        assert_eq!(v["project"]["uuid"], "f9e8d7c6b5a4938271605f4e3d2c1b0a");
        assert_eq!(v["user"]["name"], "alice");
        assert_eq!(v["flavor"]["name"], "m1.tiny");
        assert_eq!(v["flavor"]["memory_mib"], 288);
        assert_eq!(v["created"], "2026-12-06 03:00:00");
        assert_eq!(v["version"], "1.1");
    }

    #[test]
    fn nova_1_0_and_never() {
        let old = nova().replace("nova/1.1", "nova/1.0");
        let v = ManagedPolicy::default().detect(&old).unwrap().unwrap();
        assert_eq!(
            (v["system"].as_str(), v["version"].as_str()),
            (Some("nova"), Some("1.0"))
        );
        let never = ManagedPolicy::new(ManagedMode::Never, None).unwrap();
        assert!(never.detect(&nova()).unwrap().is_none());
    }

    const PLAIN: &str = "<domain type='qemu'><name>web</name><uuid>u-1</uuid><metadata><x:y xmlns:x='urn:x'/></metadata></domain>";

    #[test]
    fn plain_domain_is_not_managed_unless_asked() {
        assert!(ManagedPolicy::default().detect(PLAIN).unwrap().is_none());
        let always = ManagedPolicy::new(ManagedMode::Always, None).unwrap();
        assert_eq!(always.detect(PLAIN).unwrap().unwrap()["system"], "unknown");
        let custom = ManagedPolicy::new(ManagedMode::Auto, Some("^we")).unwrap();
        let v = custom.detect(PLAIN).unwrap().unwrap();
        assert_eq!(
            (v["system"].as_str(), v["id"].as_str()),
            (Some("custom"), Some("u-1"))
        );
        let other = ManagedPolicy::new(ManagedMode::Auto, Some("^db-")).unwrap();
        assert!(other.detect(PLAIN).unwrap().is_none());
        assert!(ManagedPolicy::new(ManagedMode::Auto, Some("(")).is_err());
    }

    #[test]
    fn cloudstack_by_name_and_by_smbios() {
        let x = PLAIN.replace("<name>web</name>", "<name>i-2-17-VM</name>");
        let v = ManagedPolicy::default().detect(&x).unwrap().unwrap();
        assert_eq!(v["system"], "cloudstack");
        assert_eq!(
            (
                v["kind"].as_str(),
                v["account_id"].as_u64(),
                v["vm_id"].as_u64()
            ),
            (Some("user"), Some(2), Some(17))
        );
        let r = PLAIN.replace("<name>web</name>", "<name>r-4-VM</name>");
        assert_eq!(
            ManagedPolicy::default().detect(&r).unwrap().unwrap()["kind"],
            "router"
        );
        for not in ["i-2-VM", "i-a-1-VM", "x-1-VM", "i-2-17-vm", "i-2-17-VM-x"] {
            assert!(cloudstack_name(not).is_none(), "{not}");
        }
        let smbios = PLAIN.replace(
            "</metadata>",
            "</metadata><sysinfo type='smbios'><system><entry name='manufacturer'>Apache Software Foundation</entry><entry name='product'>CloudStack KVM Hypervisor</entry><entry name='uuid'>u-1</entry></system></sysinfo>",
        );
        let v = ManagedPolicy::default().detect(&smbios).unwrap().unwrap();
        assert_eq!(
            (v["system"].as_str(), v["name"].as_str()),
            (Some("cloudstack"), Some("web"))
        );
    }

    #[test]
    fn ovirt() {
        let x = PLAIN.replace(
            "<x:y xmlns:x='urn:x'/>",
            "<ovirt-tune:qos xmlns:ovirt-tune='http://ovirt.org/vm/tune/1.0'/><ovirt-vm:vm xmlns:ovirt-vm='http://ovirt.org/vm/1.0'><ovirt-vm:clusterVersion>4.5</ovirt-vm:clusterVersion></ovirt-vm:vm>",
        );
        let v = ManagedPolicy::default().detect(&x).unwrap().unwrap();
        assert_eq!(
            (v["system"].as_str(), v["id"].as_str()),
            (Some("ovirt"), Some("u-1"))
        );
    }

    #[test]
    fn launch_names() {
        for bad in ["instance-0000002b", "i-2-18-VM", "r-3-VM", "I-2-x-vm"] {
            assert_eq!(
                refuse_cloud_name(bad).unwrap_err().errno(),
                libc::EINVAL,
                "{bad}"
            );
        }
        for ok in ["web-copy", "instances", "i-2-VMx"] {
            refuse_cloud_name(ok).unwrap();
        }
    }

    #[test]
    fn the_docs_have_the_table() {
        let docs = include_str!("../../../docs/libvirt.md");
        for r in RULES {
            assert!(
                docs.contains(r.doc),
                "docs/libvirt.md lacks the rule {}",
                r.doc
            );
        }
    }
}
