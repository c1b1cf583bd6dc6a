//! transport tests (issue 10): against the simulator, or a scripted server where it cannot do the thing.

#[allow(unused_imports)]
use super::*;
