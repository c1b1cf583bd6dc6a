//! HTTP client for protocol v1 and the operator API. (Being written.)
