//! ztnet coordinator: store, CA, enrollment, netmap computation and push, admin API, audit.
