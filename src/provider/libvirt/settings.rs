//! Per-instance settings, shown as `user.snapfs.<name>` extended attributes of the instance
//! directory and kept in the domain's `<metadata>` in snapfs's own namespace (like the launch
//! record), so they survive restarts and every mount of the host sees the same.
//!
//! | name | values | default |
//! | --- | --- | --- |
//! | `quiesce` | `require`, `prefer`, `off` | the mount's `--quiesce` |
//! | `memory` | `on`, `off`: mkdir of a running instance also saves CPU and memory ([`super::memory`]) | `off` |
//!
//! A cloud-managed domain's metadata is the cloud's: setting anything there is `EPERM`, its
//! settings are the mount's defaults.

use tracing::info;

use super::{lv_err, LibvirtProvider, Quiesce};
use crate::error::{Error, Result};
use crate::libvirt::{sys, Domain};
use crate::provider::Owner;

/// Namespace of our settings element in a domain's `<metadata>`.
pub(super) const SETTINGS_NS: &str = "https://snapfs.dev/xmlns/settings/1";
/// Prefix (key) of that element.
pub(super) const SETTINGS_KEY: &str = "snapfsset";
/// Every setting, in the order they are listed.
const NAMES: [&str; 2] = ["memory", "quiesce"];

/// The settings a domain's metadata holds: (name, value) pairs as stored.
fn stored(dom: &Domain) -> Vec<(String, String)> {
    let Ok(m) = dom.metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(SETTINGS_NS),
        0,
    ) else {
        return Vec::new();
    };
    let Ok(doc) = roxmltree::Document::parse(&m) else {
        return Vec::new();
    };
    doc.root_element()
        .attributes()
        .filter(|a| NAMES.contains(&a.name()))
        .map(|a| (a.name().to_string(), a.value().to_string()))
        .collect()
}

fn quiesce_name(q: Quiesce) -> &'static str {
    match q {
        Quiesce::Require => "require",
        Quiesce::Prefer => "prefer",
        Quiesce::Off => "off",
    }
}

impl LibvirtProvider {
    /// The quiesce policy for `dom`: its own setting, else the mount's.
    pub(super) fn quiesce_policy(&self, dom: &Domain) -> Quiesce {
        stored(dom)
            .into_iter()
            .find(|(n, _)| n == "quiesce")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(self.opts.quiesce)
    }

    /// Whether mkdir of `dom` saves its memory too (`user.snapfs.memory=on`).
    pub(super) fn memory_setting(&self, dom: &Domain) -> bool {
        stored(dom).iter().any(|(n, v)| n == "memory" && v == "on")
    }

    pub(super) fn instance_settings(&self, owner: &Owner) -> Result<Vec<(String, String)>> {
        let dom = self.domain(owner)?;
        let own = stored(&dom);
        let value = |n: &str, default: &str| {
            own.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| default.to_string())
        };
        Ok(vec![
            ("memory".to_string(), value("memory", "off")),
            (
                "quiesce".to_string(),
                value("quiesce", quiesce_name(self.opts.quiesce)),
            ),
        ])
    }

    pub(super) fn set_instance_setting(
        &self,
        owner: &Owner,
        name: &str,
        value: Option<&str>,
    ) -> Result<()> {
        match (name, value) {
            ("quiesce", Some(v)) => {
                v.parse::<Quiesce>()
                    .map_err(|e| Error::Invalid(format!("user.snapfs.quiesce of {owner}: {e}")))?;
            }
            ("memory", Some("off" | "on")) | (_, None) if NAMES.contains(&name) => {}
            ("memory", Some(v)) => {
                return Err(Error::Invalid(format!(
                    "user.snapfs.memory of {owner}: {v:?}: expected on or off"
                )))
            }
            _ => {
                return Err(Error::NotSupported(format!(
                    "user.snapfs.{name}: no such setting (known: {})",
                    NAMES.join(", ")
                )))
            }
        }
        let dom = self.domain(owner)?;
        if let Some(m) = self.managed_by(&dom)? {
            return Err(Error::NotPermitted(format!(
                "{owner} is managed by {}: snapfs never changes a cloud-managed domain's metadata",
                m["system"].as_str().unwrap_or("a cloud")
            )));
        }
        let mut own: Vec<(String, String)> = stored(&dom)
            .into_iter()
            .filter(|(n, _)| n != name)
            .collect();
        if let Some(v) = value {
            own.push((name.to_string(), v.to_string()));
        }
        own.sort();
        let element = (!own.is_empty()).then(|| {
            let attrs: String = own.iter().map(|(n, v)| format!(" {n}='{v}'")).collect();
            format!("<settings{attrs}/>")
        });
        let persistent = dom.is_persistent().unwrap_or(true);
        let mut flags = 0;
        if persistent {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        if dom.is_active().unwrap_or(false) {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            element.as_deref(),
            element.as_ref().map(|_| SETTINGS_KEY),
            Some(SETTINGS_NS),
            flags,
        )
        .map_err(|e| {
            lv_err(
                format!("keeping setting {name} of {owner} in its metadata"),
                e,
            )
        })?;
        info!(%owner, setting = name, value = value.unwrap_or("(default)"), "instance setting changed");
        Ok(())
    }
}
