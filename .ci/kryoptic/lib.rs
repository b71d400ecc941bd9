//! Empty: this crate only exists to build the kryoptic cdylib.
