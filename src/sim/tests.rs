//! Behaviour tests over HTTP.
