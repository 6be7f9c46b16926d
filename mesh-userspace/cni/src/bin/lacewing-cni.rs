//! `lacewing-cni`: run by the container runtime as a CNI plugin (the
//! `CNI_COMMAND` environment), or by the chart as its install step:
//!
//! ```text
//! lacewing-cni install --bin-dir DIR --conf-dir DIR [--socket PATH] [--log-file PATH] [--once]
//! lacewing-cni uninstall --bin-dir DIR --conf-dir DIR
//! ```

use std::{
    io::{Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
};

use lacewing_cni::{
    install::{self, Options},
    plugin::{self, Call},
};

const USAGE: &str = "usage: lacewing-cni install --bin-dir DIR --conf-dir DIR [--socket PATH] [--log-file PATH] [--once]\n       lacewing-cni uninstall --bin-dir DIR --conf-dir DIR\n(run by a container runtime, with CNI_COMMAND set, it is the plugin)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some(cmd @ ("install" | "uninstall")) => match options(&args[1..]) {
            Ok((opts, once)) => {
                let result = if cmd == "install" {
                    std::env::current_exe()
                        .map_err(|e| e.to_string())
                        .and_then(|me| install::run(&opts, &me, once).map_err(|e| e.to_string()))
                } else {
                    install::uninstall(&opts)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("lacewing-cni {cmd}: {err}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(err) => {
                eprintln!("lacewing-cni {cmd}: {err}\n{USAGE}");
                ExitCode::from(2)
            }
        },
        _ if std::env::var_os("CNI_COMMAND").is_some() => plugin_main(),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn plugin_main() -> ExitCode {
    let call = match Call::from_env(|k| std::env::var(k).ok()) {
        Ok(call) => call,
        Err((code, msg)) => {
            let err = plugin::CniError {
                cni_version: "1.0.0".to_owned(),
                code,
                msg,
                details: String::new(),
            };
            println!(
                "{}",
                serde_json::to_string(&err).expect("an error serializes")
            );
            return ExitCode::FAILURE;
        }
    };
    let mut stdin = Vec::new();
    if call.command != plugin::Command::Version {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    let outcome = plugin::run(&call, &stdin);
    plugin::log(&stdin, &outcome.log);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn options(args: &[String]) -> Result<(Options, bool), String> {
    let mut opts = Options {
        bin_dir: PathBuf::new(),
        conf_dir: PathBuf::new(),
        socket: PathBuf::from(plugin::DEFAULT_SOCKET),
        log_file: PathBuf::from(plugin::DEFAULT_LOG),
    };
    let mut once = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (arg.as_str(), None),
        };
        if flag == "--once" {
            once = true;
            continue;
        }
        let value = inline
            .or_else(|| it.next().cloned())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        match flag {
            "--bin-dir" => opts.bin_dir = value.into(),
            "--conf-dir" => opts.conf_dir = value.into(),
            "--socket" => opts.socket = value.into(),
            "--log-file" => opts.log_file = value.into(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if opts.bin_dir.as_os_str().is_empty() || opts.conf_dir.as_os_str().is_empty() {
        return Err("--bin-dir and --conf-dir are required".to_owned());
    }
    Ok((opts, once))
}
