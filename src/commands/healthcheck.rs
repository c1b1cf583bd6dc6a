//! `healthcheck`: the probe the image's HEALTHCHECK and the chart's `helm test` run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};

use super::Refused;

/// The health server's URL for `healthcheck`: `/readyz` (`/healthz` when `live`) on `addr`, with an
/// address that binds every interface (`0.0.0.0`, `[::]`) asked on loopback.
///
/// # Errors
/// Port 0 (the daemon picks a port at random): there is nothing to ask; give `--url`.
pub fn health_url(addr: SocketAddr, live: bool) -> anyhow::Result<String> {
    if addr.port() == 0 {
        bail!(
            "the health address {addr} (APONO_HEALTH_ADDR) has port 0, so the daemon picked one at random: \
             give --url with the port it logged"
        );
    }
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if live { "healthz" } else { "readyz" };
    Ok(format!("http://{addr}/{path}"))
}

/// The start of an answer's body kept for `healthcheck`'s line (`/readyz` gives its reason there).
const HEALTH_BODY_BYTES: usize = 300;

/// `healthcheck`: GETs `url` (no proxy, no redirect) and returns the line to print when it answers
/// 200 within `timeout`.
///
/// # Errors
/// [`Refused`] (exit 3) when it answers another status, refuses the connection or does not answer
/// in time, saying which; a URL that is not one.
pub async fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let parsed = url::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("--url {url:?}: expected an http:// or https:// URL");
    }
    // A proxy from the environment has no business with a probe of this host's own port.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .context("building the HTTP client")?;
    let mut resp = match client.get(parsed).send().await {
        Ok(resp) => resp,
        Err(e) if e.is_timeout() => {
            return Err(Refused(format!(
                "not ready: {url} did not answer within {} s",
                timeout.as_secs_f64()
            ))
            .into());
        }
        Err(e) if e.is_connect() => {
            return Err(Refused(format!(
                "not ready: {url} refused the connection (is the daemon running, and is APONO_HEALTH_ADDR its address?)"
            ))
            .into());
        }
        Err(e) => return Err(Refused(format!("not ready: {url}: {}", crate::error_chain(&e))).into()),
    };
    let status = resp.status();
    let mut body = Vec::new();
    while body.len() < HEALTH_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            // A body cut short (or too slow) still leaves the status to report.
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(HEALTH_BODY_BYTES);
    let text = String::from_utf8_lossy(&body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let said = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    if status == reqwest::StatusCode::OK {
        Ok(format!("ready: {url} answered {status}{said}"))
    } else {
        Err(Refused(format!("not ready: {url} answered {status}{said}")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_that_binds_everything_is_asked_on_loopback() {
        let url = |addr: &str, live| health_url(addr.parse().unwrap(), live).unwrap();
        assert_eq!(url("0.0.0.0:8080", false), "http://127.0.0.1:8080/readyz");
        assert_eq!(url("[::]:8080", false), "http://[::1]:8080/readyz");
        assert_eq!(url("10.1.2.3:9000", true), "http://10.1.2.3:9000/healthz");
        let e = health_url("0.0.0.0:0".parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("--url"), "{e}");
    }
}
