//! Identity rules: the one form of a Qdrant point id, and the key a (bot, user) is forgotten by.

/// Whether Qdrant can take `id` as a point id: an unsigned integer or a UUID. Anything else fails a whole request.
pub fn is_point_id(id: &str) -> bool {
    id.parse::<u64>().is_ok() || uuid::Uuid::parse_str(id).is_ok()
}

/// The one form of a point id recap compares and stores (issue 24, case 7): an unsigned integer in decimal without
/// leading zeros, a UUID lowercase and hyphenated (the form Qdrant answers with), whatever form the event or the
/// payload wrote (`uuid4().hex`, upper case, braces, `urn:uuid:`, `007`). `None` for anything Qdrant cannot take.
pub fn canonical_point_id(id: &str) -> Option<String> {
    if let Ok(n) = id.parse::<u64>() {
        return Some(n.to_string());
    }
    uuid::Uuid::parse_str(id)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

/// The key of a (bot, user) in `recap_forgotten`: a SHA-256 of both, hex (never the user id in clear text).
pub fn user_key(bot: &str, user_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{bot}\u{0}{user_id}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}
