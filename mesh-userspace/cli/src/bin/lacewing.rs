//! `lacewing`: the command line (lab, maps, demo).

use clap::Parser as _;

fn main() {
    let _log_level = lacewing_sys::telemetry::init(lacewing_sys::telemetry::LogFormat::Text);
    let cli = lacewing::cli::Cli::parse();
    match lacewing::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
    }
}
