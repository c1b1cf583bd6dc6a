//! Telemetry. (Being written.)
