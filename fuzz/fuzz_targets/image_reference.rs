//! Image reference parsing and the pinning decisions (`moat::image`): the input is
//! `spec.server.image` as a user writes it (and, for `credentials`, the bytes of a
//! `.dockerconfigjson`).
//!
//! Asserts: no panic; registry normalisation is idempotent and a reference's own registry is
//! allowed by an allow-list naming it; what Moat pins (`registry/repository@digest`, from a
//! digest in the spec or one the registry returned for a tag) parses back to the same registry,
//! repository and digest; and `plan` agrees with `parse` and with `RequireDigest`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use moat::{
    api::ImagePolicy,
    image::{self, Plan},
};

const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn check_pin(pinned: &str, registry: &str, repository: &str, digest: &str) {
    let again = image::parse(pinned)
        .unwrap_or_else(|e| panic!("the pinned reference {pinned:?} does not parse: {e}"));
    assert_eq!(again.registry(), registry, "registry of {pinned:?}");
    assert_eq!(again.repository(), repository, "repository of {pinned:?}");
    assert_eq!(again.digest(), Some(digest), "digest of {pinned:?}");
    assert_eq!(again.tag(), None, "tag of {pinned:?}");
}

fuzz_target!(|data: &[u8]| {
    let _ = image::credentials(
        &[("fuzz".to_string(), data.to_vec())],
        "registry.example.com",
    );
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let normal = image::normalize_registry(s);
    assert_eq!(
        image::normalize_registry(&normal),
        normal,
        "normalize_registry({s:?})"
    );
    let resolve = image::plan(s, ImagePolicy::Resolve, &[], None, None);
    let require = image::plan(s, ImagePolicy::RequireDigest, &[], None, None);
    let reference = match image::parse(s) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            assert!(resolve.is_err() && require.is_err(), "plan accepted {s:?}");
            return;
        }
    };
    let (registry, repository) = (reference.registry(), reference.repository());
    assert!(
        image::check_allowed(&reference, &[registry.to_string()]).is_ok(),
        "{s:?} is not allowed by its own registry {registry:?}"
    );
    let _ = image::credentials(&[("fuzz".to_string(), data.to_vec())], registry);
    // The operator's pin after resolving a tag.
    check_pin(
        &image::pinned(&reference, DIGEST),
        registry,
        repository,
        DIGEST,
    );
    match reference.digest() {
        Some(digest) => {
            let pinned = image::pinned(&reference, digest);
            check_pin(&pinned, registry, repository, digest);
            assert_eq!(resolve, Ok(Plan::Digest(pinned.clone())), "plan of {s:?}");
            assert_eq!(require, Ok(Plan::Digest(pinned)), "plan of {s:?}");
        }
        None => {
            assert!(
                matches!(resolve, Ok(Plan::Resolve(_))),
                "plan of {s:?}: {resolve:?}"
            );
            assert!(require.is_err(), "RequireDigest accepted {s:?}");
        }
    }
});
