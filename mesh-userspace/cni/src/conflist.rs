//! Chaining `lacewing-cni` into the node's primary CNI configuration, as the
//! chart's install step does on every node: the container runtime reads the
//! first configuration file of its configuration folder (lexical order, as
//! libcni sorts them) and runs its plugins in order; ours goes last, after
//! the primary CNI has wired the pod and left its result.
//!
//! The primary CNI may rewrite its file at any time (Calico and Cilium do
//! on start): [`ensure`] is run again on every change and puts the entry
//! back. [`restore`] undoes it: the original bytes when the file is still
//! what we wrote, otherwise only our entry is taken out.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

/// The `type` of our entry (the binary's name in the CNI bin folder).
pub const PLUGIN_TYPE: &str = "lacewing-cni";

/// What was there before we first changed a file, kept beside it under a
/// name the runtime never reads (it reads `.conf`, `.conflist`, `.json`).
fn backup_of(file: &Path) -> PathBuf {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    file.with_file_name(format!(".{name}.lacewing-orig"))
}

#[derive(Debug, thiserror::Error)]
pub enum ConflistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: no CNI configuration (.conflist, .conf, .json) yet; the primary CNI writes one when it starts"
    )]
    NoConfig(PathBuf),
    #[error("{path}: not JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{0}: neither a network list (`plugins`) nor a single network (`type`)")]
    NotCni(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConflistError + '_ {
    move |source| ConflistError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The file the runtime uses in `dir`: the first in lexical order with a
/// CNI configuration's extension.
pub fn primary(dir: &Path) -> Result<PathBuf, ConflistError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| ConflistError::NoConfig(dir.to_owned()))
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// The entry was added to this file.
    Added(PathBuf),
    /// The file already ends with our entry (as `entry` has it).
    Present(PathBuf),
}

/// Makes the primary configuration in `dir` end with `entry` (whose `type`
/// is [`PLUGIN_TYPE`]). A single-network `.conf` becomes a list of it and
/// ours, written as `.conflist` in its place. Idempotent.
pub fn ensure(dir: &Path, entry: &Value) -> Result<Ensured, ConflistError> {
    let file = primary(dir)?;
    let text = fs::read_to_string(&file).map_err(io(&file))?;
    let mut conf: Value = serde_json::from_str(&text).map_err(|source| ConflistError::Json {
        path: file.clone(),
        source,
    })?;
    let obj = conf
        .as_object_mut()
        .ok_or_else(|| ConflistError::NotCni(file.clone()))?;
    let is_ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
    let mut primary_only = true;
    let (mut list, target) = if let Some(plugins) = obj.get("plugins") {
        let plugins = plugins
            .as_array()
            .ok_or_else(|| ConflistError::NotCni(file.clone()))?;
        if plugins.last() == Some(entry) {
            return Ok(Ensured::Present(file));
        }
        primary_only = !plugins.iter().any(is_ours);
        (obj.clone(), file.clone())
    } else if obj.contains_key("type") {
        // A single network: the list of it alone, under a list's name.
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = obj.get(key) {
                list.insert(key.to_owned(), v.clone());
            }
        }
        let mut single = obj.clone();
        single.remove("name");
        single.remove("cniVersion");
        list.insert(
            "plugins".to_owned(),
            Value::Array(vec![Value::Object(single)]),
        );
        (list, file.with_extension("conflist"))
    } else {
        return Err(ConflistError::NotCni(file));
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .expect("a list has plugins");
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    // The primary's own text, kept whenever it wrote the file last (a
    // rewrite replaces what was kept before).
    if primary_only {
        write_whole(&backup_of(&target), &text)?;
    }
    let mut out = serde_json::to_string_pretty(&Value::Object(list)).expect("JSON writes");
    out.push('\n');
    write_whole(&target, &out)?;
    if target != file {
        fs::remove_file(&file).map_err(io(&file))?;
    }
    Ok(Ensured::Added(target))
}

/// Takes our entry out of the primary configuration in `dir`: the original
/// file comes back as it was if nothing else changed it since. Returns
/// whether anything was ours.
pub fn restore(dir: &Path) -> Result<bool, ConflistError> {
    let file = match primary(dir) {
        Ok(file) => file,
        Err(ConflistError::NoConfig(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let text = fs::read_to_string(&file).map_err(io(&file))?;
    let mut conf: Value = serde_json::from_str(&text).map_err(|source| ConflistError::Json {
        path: file.clone(),
        source,
    })?;
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(false);
    };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.len() == before {
        // The primary rewrote it without us: what was kept is stale.
        let _ = fs::remove_file(backup_of(&file));
        return Ok(false);
    }
    let backup = backup_of(&file);
    let original = fs::read_to_string(&backup).ok();
    let same_otherwise = original
        .as_deref()
        .and_then(|o| serde_json::from_str::<Value>(o).ok())
        .is_some_and(|o| o == conf || single_of(&conf).as_ref() == Some(&o));
    match original {
        // Only our entry differs: the primary's own bytes come back (and
        // its own file name, for a `.conf` we made a list of).
        Some(original) if same_otherwise => {
            let was = original_name(&file, &original);
            write_whole(&was, &original)?;
            if was != file {
                fs::remove_file(&file).map_err(io(&file))?;
            }
        }
        _ => {
            let mut out = serde_json::to_string_pretty(&conf).expect("JSON writes");
            out.push('\n');
            write_whole(&file, &out)?;
        }
    }
    let _ = fs::remove_file(&backup);
    Ok(true)
}

/// The single network a one-plugin list was made from.
fn single_of(list: &Value) -> Option<Value> {
    let plugins = list.get("plugins")?.as_array()?;
    let [only] = plugins.as_slice() else {
        return None;
    };
    let mut single = only.as_object()?.clone();
    for key in ["cniVersion", "name"] {
        if let Some(v) = list.get(key) {
            single.insert(key.to_owned(), v.clone());
        }
    }
    Some(Value::Object(single))
}

/// Where the original text lived: a single network was a `.conf`.
fn original_name(file: &Path, original: &str) -> PathBuf {
    let single = serde_json::from_str::<Value>(original)
        .ok()
        .is_some_and(|v| v.get("plugins").is_none());
    if single {
        file.with_extension("conf")
    } else {
        file.to_owned()
    }
}

/// Writes `path` whole (a temporary file renamed over it): the runtime
/// never reads half a configuration.
fn write_whole(path: &Path, text: &str) -> Result<(), ConflistError> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    fs::write(&tmp, text).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bridge plugin's conflist as a kubeadm tutorial writes it.
    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

    fn entry() -> Value {
        serde_json::json!({"type": PLUGIN_TYPE, "socket": "/var/run/lacewing/cni.sock"})
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lacewing-cni-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn our_entry_goes_last_once_and_the_original_comes_back_byte_for_byte() {
        let dir = temp("bridge");
        fs::write(dir.join("10-bridge.conflist"), BRIDGE).unwrap();
        fs::write(dir.join("99-loopback.conf"), "{}").unwrap();
        let file = dir.join("10-bridge.conflist");
        assert_eq!(
            ensure(&dir, &entry()).unwrap(),
            Ensured::Added(file.clone())
        );
        assert_eq!(
            ensure(&dir, &entry()).unwrap(),
            Ensured::Present(file.clone())
        );
        let conf: Value = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        let types: Vec<&str> = conf["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN_TYPE]);
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert!(restore(&dir).unwrap());
        assert_eq!(fs::read_to_string(&file).unwrap(), BRIDGE);
        assert!(!restore(&dir).unwrap(), "nothing of ours is left");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_the_primary_rewrote_gets_the_entry_again_and_loses_only_ours() {
        let dir = temp("rewrite");
        let file = dir.join("10-bridge.conflist");
        fs::write(&file, BRIDGE).unwrap();
        ensure(&dir, &entry()).unwrap();
        // The primary CNI writes its own file again, with a new subnet.
        let rewritten = BRIDGE.replace("10.244.0.0/24", "10.244.7.0/24");
        fs::write(&file, &rewritten).unwrap();
        assert_eq!(
            ensure(&dir, &entry()).unwrap(),
            Ensured::Added(file.clone())
        );
        assert!(restore(&dir).unwrap());
        assert_eq!(fs::read_to_string(&file).unwrap(), rewritten);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_single_network_becomes_a_list_and_returns_as_it_was() {
        let dir = temp("single");
        let single = "{\"cniVersion\": \"0.4.0\", \"name\": \"net\", \"type\": \"ptp\", \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.1.0.0/24\"}}\n";
        fs::write(dir.join("10-net.conf"), single).unwrap();
        let list = dir.join("10-net.conflist");
        assert_eq!(
            ensure(&dir, &entry()).unwrap(),
            Ensured::Added(list.clone())
        );
        assert!(!dir.join("10-net.conf").exists());
        let conf: Value = serde_json::from_str(&fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(conf["name"], "net");
        assert_eq!(conf["plugins"][0]["type"], "ptp");
        assert_eq!(conf["plugins"][1]["type"], PLUGIN_TYPE);
        assert!(restore(&dir).unwrap());
        assert_eq!(fs::read_to_string(dir.join("10-net.conf")).unwrap(), single);
        assert!(!list.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_configuration_yet_and_bad_json_are_errors_that_say_so() {
        let dir = temp("empty");
        assert!(matches!(
            ensure(&dir, &entry()),
            Err(ConflistError::NoConfig(_))
        ));
        fs::write(dir.join("10-x.conflist"), "{not json").unwrap();
        assert!(matches!(
            ensure(&dir, &entry()),
            Err(ConflistError::Json { .. })
        ));
        let _ = fs::remove_dir_all(&dir);
    }
}
