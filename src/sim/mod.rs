//! Rancher API simulator. (Being written.)
