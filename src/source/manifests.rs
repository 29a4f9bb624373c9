//! The `--manifests DIR` source.
