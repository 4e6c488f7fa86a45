//! Passwords in connection URLs (`amqp://user:PASSWORD@host`, `redis://:PASSWORD@host`) never reach
//! a log, an error or a `Debug` print: they are replaced by `***`.

/// The password of `url`'s user info, if it has one.
fn password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    let p = &userinfo[userinfo.find(':')? + 1..];
    (!p.is_empty()).then_some(p)
}

/// `url` with its password shown as `***`.
pub fn redacted(url: &str) -> String {
    scrub(url, url)
}

/// `text` with every occurrence of `url`'s password shown as `***` (for errors that echo a URL).
pub fn scrub(text: &str, url: &str) -> String {
    match password(url) {
        Some(p) => text.replace(p, "***"),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(
            redacted("amqp://ddit:s3cr:et@rabbit:5672/%2f"),
            "amqp://ddit:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redacted("rediss://:pw@redis:6380/0"),
            "rediss://:***@redis:6380/0"
        );
        assert_eq!(
            redacted("amqp://guest@host/v?x=a:b@c"),
            "amqp://guest@host/v?x=a:b@c"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redacted("not a url"), "not a url");
        assert_eq!(
            scrub(
                "bad uri amqp://u:hunter2@[x: hunter2",
                "amqp://u:hunter2@[x"
            ),
            "bad uri amqp://u:***@[x: ***"
        );
    }
}
