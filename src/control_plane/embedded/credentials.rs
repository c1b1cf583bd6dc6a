//! One-time credentials on a shared (PostgreSQL) state: a new user's password, from its grant or
//! a rotation, is kept in the database **sealed**, so the requester's first read gets it from any
//! replica, and a copy of the database (a backup, a dump) holds no usable password.
//!
//! - AES-256-GCM (aws-lc-rs, the crypto rustls already links), a random 96-bit nonce per seal,
//!   the access id as associated data: a sealed value copied onto another access's row does not
//!   open.
//! - The key is derived with HKDF-SHA256 from the operator token (required with a database and the
//!   same on every replica), salted with the install id, under an info string naming the purpose
//!   and version ([`KEY_INFO`]). A short key id (another HKDF output, it reveals nothing of the key)
//!   is stored beside the value, so a replica whose token differs leaves the value for the others
//!   and says why, instead of destroying it.
//! - Taken on the first read (`DELETE … RETURNING`: two replicas reading at once give it to one),
//!   deleted when the access ends, ignored and pruned [`KEEP_FOR`] (24 h) after it was sealed.
//!
//! On SQLite (one process) nothing is written: the credentials stay in the control plane's memory,
//! as they always have.

use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, KeyType, Salt};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use secrecy::zeroize::Zeroize;
use secrecy::{ExposeSecret, SecretString};

use super::{EmbeddedControlPlane, now, view};
use crate::control_plane::ControlPlaneError;
use crate::control_plane::operator::AccessRequest;
use crate::control_plane::store::{self, Db, SealedRow};
use crate::integrations::Credentials;

/// How long sealed credentials wait for their first read: after that they are ignored, and the
/// scheduler's pruning deletes them.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);

/// HKDF info of the sealing key: what it is for, and the version of this format.
pub const KEY_INFO: &[u8] = b"apono-connector one-time-credentials aes-256-gcm v1";
/// HKDF info of the key id stored beside each value.
const KEY_ID_INFO: &[u8] = b"apono-connector one-time-credentials key-id v1";

/// What the requester reads when the credentials were sealed under another operator token.
pub const OTHER_TOKEN_NOTE: &str = "this access's one-time credentials are kept sealed under another operator token \
     and cannot be opened here: the operator token changed after the grant, or this replica's \
     APONO_OPERATOR_TOKEN differs from the other replicas' (it must be the same on every replica). \
     For a new password: revoke this access (apono-connector access revoke ID) and request it again \
     with --create-user, which sets one; with credential_rotation_days set, the next rotation also \
     shows a new one here";

/// What the requester reads when the stored credentials do not open with the right key.
pub const DAMAGED_NOTE: &str = "this access's one-time credentials could not be opened (the stored copy is damaged \
     or was not sealed for this access) and were discarded. For a new password: revoke this access \
     (apono-connector access revoke ID) and request it again with --create-user";

/// Why credentials could not be sealed or opened. Never carries the credentials.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot derive the sealing key from the operator token")]
    Key,
    #[error("sealing the one-time credentials failed")]
    Seal,
    #[error("the sealed one-time credentials are damaged or were sealed for another access")]
    Damaged,
}

/// The sealing key of this control plane's state.
pub struct Sealer {
    key: RandomizedNonceKey,
    key_id: String,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// An HKDF output length.
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Sealer {
    /// The key for `install_id`'s state under `operator_token`.
    ///
    /// # Errors
    /// `Key` if the crypto library refuses (it does not for these lengths).
    pub fn new(operator_token: &SecretString, install_id: &str) -> Result<Sealer, SealError> {
        let prk = Salt::new(HKDF_SHA256, install_id.as_bytes()).extract(operator_token.expose_secret().as_bytes());
        let mut key = [0u8; 32];
        let mut id = [0u8; 8];
        let derived = prk
            .expand(&[KEY_INFO], Len(key.len()))
            .and_then(|okm| okm.fill(&mut key))
            .and_then(|()| prk.expand(&[KEY_ID_INFO], Len(id.len())))
            .and_then(|okm| okm.fill(&mut id))
            .and_then(|()| RandomizedNonceKey::new(&AES_256_GCM, &key));
        key.zeroize();
        Ok(Sealer {
            key: derived.map_err(|_| SealError::Key)?,
            key_id: format!("v1-{}", hex::encode(id)),
        })
    }

    /// Which key this is (stored beside each value; not secret).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Seals `creds` for `access_id`: base64 of nonce, ciphertext and tag.
    ///
    /// # Errors
    /// `Seal` if the credentials do not serialize or the cipher fails.
    pub fn seal(&self, access_id: &str, creds: &Credentials, t: DateTime<Utc>) -> Result<SealedRow, SealError> {
        let mut buf = serde_json::to_vec(creds).map_err(|_| SealError::Seal)?;
        let sealed = self
            .key
            .seal_in_place_append_tag(Aad::from(access_id.as_bytes()), &mut buf);
        let nonce = match sealed {
            Ok(n) => n,
            Err(_) => {
                buf.zeroize();
                return Err(SealError::Seal);
            }
        };
        let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf);
        Ok(SealedRow {
            key_id: self.key_id.clone(),
            sealed: B64.encode(out),
            created_at: t,
        })
    }

    /// Opens what [`Sealer::seal`] made for `access_id`.
    ///
    /// # Errors
    /// `Damaged` when it does not decode or authenticate (another access's value, a changed byte).
    pub fn open(&self, access_id: &str, row: &SealedRow) -> Result<Credentials, SealError> {
        let mut bytes = B64.decode(&row.sealed).map_err(|_| SealError::Damaged)?;
        if bytes.len() < NONCE_LEN {
            return Err(SealError::Damaged);
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN]).map_err(|_| SealError::Damaged)?;
        let opened = match self
            .key
            .open_in_place(nonce, Aad::from(access_id.as_bytes()), &mut bytes[NONCE_LEN..])
        {
            Ok(plain) => serde_json::from_slice::<Credentials>(plain).map_err(|_| SealError::Damaged),
            Err(_) => Err(SealError::Damaged),
        };
        bytes.zeroize();
        opened
    }
}

/// The view with `note` added after the row's own.
fn with_note(mut a: AccessRequest, note: &str) -> AccessRequest {
    a.note = Some(match a.note.take() {
        Some(own) if !own.is_empty() => format!("{own}; {note}"),
        _ => note.to_string(),
    });
    a
}

impl EmbeddedControlPlane {
    /// Keeps (sealed) the credentials a completed job brought, or forgets an ended access's, in
    /// the completion's transaction: a read that sees the new state also finds them.
    pub(super) fn keep_sealed(
        &self,
        tx: &dyn Db,
        sealer: &Sealer,
        new: Option<&(String, Credentials)>,
        forget: Option<&str>,
        t: DateTime<Utc>,
    ) -> Result<(), ControlPlaneError> {
        if let Some((id, creds)) = new {
            match sealer.seal(id, creds, t) {
                Ok(row) => store::put_one_time_credentials(tx, id, &row)?,
                // The grant stands; only its password is lost, and the requester is told how to
                // get another when they read the access.
                Err(e) => {
                    tracing::error!(access = %id, error = %e, "the new password could not be sealed and is not kept")
                }
            }
        }
        if let Some(id) = forget
            && store::delete_one_time_credentials(tx, id)?
        {
            tracing::info!(access = %id, "the access ended: its unread one-time credentials are deleted");
        }
        Ok(())
    }

    /// One access request on a shared state: its sealed credentials, if any, are taken and
    /// opened on this first read. Sealed under another token: left in place (a replica with the
    /// right token may still read them) and the read says why, with what to do.
    pub(super) fn access_sealed(&self, sealer: &Sealer, id: &str) -> Result<Option<AccessRequest>, ControlPlaneError> {
        let conn = self.store.lock()?;
        let Some(row) = store::access(&*conn, id)? else {
            return Ok(None);
        };
        let since = now()
            .checked_sub_signed(chrono::Duration::from_std(KEEP_FOR).unwrap_or_default())
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let Some(key_id) = store::one_time_credentials_key(&*conn, id, since)? else {
            return Ok(Some(view(row, None)));
        };
        if key_id != sealer.key_id() {
            drop(conn);
            tracing::warn!(access = %id, sealed_with = %key_id, this_key = %sealer.key_id(), "one-time credentials sealed under another operator token: not opened here");
            return Ok(Some(with_note(view(row, None), OTHER_TOKEN_NOTE)));
        }
        let Some(sealed) = store::take_one_time_credentials(&*conn, id, &key_id, since)? else {
            // Another replica's read took them between the two statements.
            return Ok(Some(view(row, None)));
        };
        // Read again: the view is then as new as the credentials (a grant's commit wrote both).
        let row = match store::access(&*conn, id) {
            Ok(Some(fresh)) => fresh,
            _ => row,
        };
        drop(conn);
        match sealer.open(id, &sealed) {
            Ok(creds) => Ok(Some(view(row, Some(creds)))),
            Err(e) => {
                tracing::error!(access = %id, error = %e, "one-time credentials could not be opened; discarded");
                Ok(Some(with_note(view(row, None), DAMAGED_NOTE)))
            }
        }
    }

    /// Deletes sealed credentials nobody read within [`KEEP_FOR`] of `t`.
    pub(super) fn prune_sealed(&self, c: &dyn Db, t: DateTime<Utc>) -> Result<usize, ControlPlaneError> {
        let cutoff = t
            .checked_sub_signed(chrono::Duration::from_std(KEEP_FOR).unwrap_or_default())
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        Ok(store::prune_one_time_credentials(c, cutoff)?)
    }
}

#[cfg(test)]
mod tests;
