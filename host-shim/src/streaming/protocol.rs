//! Subprotocol names, channel numbers and the error-channel status format of
//! the Kubernetes streaming protocols.

use serde_json::json;

/// SPDY exec/attach subprotocols, newest first (`X-Stream-Protocol-Version`).
pub const SPDY_EXEC: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
pub const SPDY_PORT_FORWARD: &[&str] = &["portforward.k8s.io"];
/// WebSocket exec/attach subprotocols (`Sec-WebSocket-Protocol`).
pub const WS_EXEC: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
/// WebSocket port-forward subprotocols.
pub const WS_PORT_FORWARD: &[&str] = &[
    "portforward.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
];

/// SPDY stream types (`streamType` header) and WebSocket channel numbers.
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: `[255, channel]` closes that channel.
pub const CLOSE: u8 = 255;

pub fn stream_type_name(ch: u8) -> &'static str {
    match ch {
        STDIN => "stdin",
        STDOUT => "stdout",
        STDERR => "stderr",
        ERROR => "error",
        RESIZE => "resize",
        _ => "unknown",
    }
}

pub fn stream_type(name: &str) -> Option<u8> {
    Some(match name {
        "stdin" => STDIN,
        "stdout" => STDOUT,
        "stderr" => STDERR,
        "error" => ERROR,
        "resize" => RESIZE,
        _ => return None,
    })
}

/// The first of the client's protocols (in its order) the server supports.
/// Clients send either several header values or one comma-separated list.
pub fn negotiate<'a>(client: &[String], server: &'a [&'a str]) -> Option<&'a str> {
    client
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|c| server.iter().find(|s| **s == c).copied())
}

/// How the error channel reports the end of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFormat {
    /// v1–v3: the error text itself; nothing on success.
    Text,
    /// v4+: a metav1.Status JSON object.
    Json,
}

impl StatusFormat {
    pub fn for_protocol(p: &str) -> Self {
        if p.starts_with("v4.") || p.starts_with("v5.") {
            StatusFormat::Json
        } else {
            StatusFormat::Text
        }
    }
}

/// Whether the protocol can carry terminal resizes.
pub fn has_resize(p: &str) -> bool {
    !matches!(p, "channel.k8s.io" | "v2.channel.k8s.io")
}

/// WebSocket framing: base64 text messages or binary ones.
pub fn is_base64(p: &str) -> bool {
    p.contains("base64")
}

/// The error-channel message for an exit code (None = nothing to send).
pub fn exit_status(format: StatusFormat, code: i32) -> Option<Vec<u8>> {
    match (format, code) {
        (StatusFormat::Json, 0) => Some(
            json!({"metadata": {}, "status": "Success"})
                .to_string()
                .into_bytes(),
        ),
        (StatusFormat::Text, 0) => None,
        (StatusFormat::Json, c) => Some(
            json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {c}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]}
            })
            .to_string()
            .into_bytes(),
        ),
        (StatusFormat::Text, c) => Some(
            format!("command terminated with non-zero exit code: exit status {c}").into_bytes(),
        ),
    }
}

/// The error-channel message for a failure that is not an exit code.
pub fn error_status(format: StatusFormat, message: &str) -> Vec<u8> {
    match format {
        StatusFormat::Json => json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500
        })
        .to_string()
        .into_bytes(),
        StatusFormat::Text => message.as_bytes().to_vec(),
    }
}

/// What a client makes of the error channel: Ok(exit code) or Err(message).
pub fn parse_status(format: StatusFormat, data: &[u8]) -> Result<i32, String> {
    if data.is_empty() {
        // v4+ servers always send a status: none means the stream broke.
        return match format {
            StatusFormat::Text => Ok(0),
            StatusFormat::Json => Err("the connection ended without an exit status".into()),
        };
    }
    if format == StatusFormat::Text {
        return Err(String::from_utf8_lossy(data).into_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("bad status from server: {e}"))?;
    if v["status"] == "Success" {
        return Ok(0);
    }
    if v["reason"] == "NonZeroExitCode"
        && let Some(causes) = v["details"]["causes"].as_array()
    {
        for c in causes {
            if c["reason"] == "ExitCode"
                && let Some(code) = c["message"].as_str().and_then(|m| m.parse().ok())
            {
                return Ok(code);
            }
        }
    }
    Err(v["message"].as_str().unwrap_or("unknown error").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_client_order() {
        let c = vec![
            "v4.channel.k8s.io".to_string(),
            "channel.k8s.io".to_string(),
        ];
        assert_eq!(negotiate(&c, SPDY_EXEC), Some("v4.channel.k8s.io"));
        let c = vec!["v9.channel.k8s.io, v3.channel.k8s.io".to_string()];
        assert_eq!(negotiate(&c, SPDY_EXEC), Some("v3.channel.k8s.io"));
        assert_eq!(negotiate(&["bogus".to_string()], SPDY_EXEC), None);
    }

    #[test]
    fn statuses_parse_back() {
        for f in [StatusFormat::Json, StatusFormat::Text] {
            let ok = exit_status(f, 0).unwrap_or_default();
            assert_eq!(parse_status(f, &ok), Ok(0));
        }
        assert!(parse_status(StatusFormat::Json, b"").is_err());
        let s = exit_status(StatusFormat::Json, 42).expect("status");
        assert_eq!(parse_status(StatusFormat::Json, &s), Ok(42));
        let v: serde_json::Value = serde_json::from_slice(&s).expect("json");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert!(
            parse_status(
                StatusFormat::Json,
                &error_status(StatusFormat::Json, "boom")
            )
            .is_err()
        );
    }
}
