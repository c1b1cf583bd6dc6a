use super::super::tests::*;
