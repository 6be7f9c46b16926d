//! `lacewing-controller`: the control plane. It watches Kubernetes (or a folder
//! of the same YAML) and streams each node its configuration; that arrives with
//! the control-plane issue. Until then it says so and exits non-zero rather than
//! pretending to serve.

fn main() {
    eprintln!(
        "lacewing-controller {}: the control plane is not built yet; nodes run from local input",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
