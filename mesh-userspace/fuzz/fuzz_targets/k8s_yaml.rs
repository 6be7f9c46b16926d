//! The folder source and the Kubernetes translation: any YAML text, as a
//! file in the watched folder (Services, EndpointSlices, Pods, Namespaces,
//! our CRDs, HTTPRoutes), parsed and translated to the model, and the
//! routes of what was accepted compiled into their table. Bad input must
//! come back as an error, never a panic; and what the translation accepts,
//! a node accepts too.
#![no_main]

use lacewing_core::model::{k8s, routes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let mut objects = k8s::Objects::default();
    if objects.add_yaml("fuzz.yaml", text).is_err() {
        return;
    }
    let Ok(translation) = k8s::translate_all(&[&objects]) else {
        return;
    };
    let Ok(declared) = translation.strict() else {
        return;
    };
    if let Err(err) = declared.services.validate() {
        panic!("the translation accepted services a node rejects: {err}");
    }
    let _ = routes::table(&declared.routes);
});
