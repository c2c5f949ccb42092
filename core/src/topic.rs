//! AMQP topic matching, as RabbitMQ's topic exchange does it.
//!
//! A key is a list of words separated by `.`. In a binding pattern, the word `*` matches
//! exactly one word and the word `#` matches zero or more words; every other word matches
//! itself only. `*` and `#` are wildcards only as whole words (`a*` is a literal word), and
//! they are never wildcards in a routing key.
//!
//! Splitting follows RabbitMQ's `split_topic_key` exactly: the empty string is **zero**
//! words, and any other string is one word more than it has dots, so `"a."` is `["a", ""]`
//! and `"."` is `["", ""]`. Consequences: `#` matches `""`, `*` does not match `""` (it needs
//! one word, and `""` has none), the pattern `""` matches only the key `""`, and `*` matches
//! `"a"` but not `"."`. (Checked against RabbitMQ 3.10.8 on every pattern of up to three
//! words over `a`, `b`, `*`, `#`, `""` and every key of up to three words over `a`, `b`, `""`.)

/// AMQP topic matching: words separated by '.', '*' matches exactly one word, '#' matches
/// zero or more words.
///
/// `pattern` is a binding key, `routing_key` a message's routing key. Follows RabbitMQ's
/// semantics, including the empty key (zero words: matched by `#`, `#.#` and `""`, not by
/// `*`; see the module doc). Does not allocate and never panics; runs in
/// O(words(pattern) × words(key)) at worst, linear for patterns with at most one `#`.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    if !pattern.bytes().any(|b| b == b'*' || b == b'#') {
        // No wildcard: word lists are equal exactly when the strings are.
        return pattern == routing_key;
    }
    let mut pat = words(pattern);
    let mut key = words(routing_key);
    // Where to resume after a mismatch: the pattern just past the latest `#`, and the key
    // position that `#` currently stops at. Backtracking only to the latest `#` is enough,
    // as in glob matching: a later `#` can absorb whatever an earlier one could.
    let mut resume: Option<(Words<'_>, Words<'_>)> = None;
    loop {
        let mut pat_next = pat.clone();
        let pat_word = pat_next.next();
        if pat_word == Some("#") {
            resume = Some((pat_next.clone(), key.clone()));
            pat = pat_next;
            continue;
        }
        let mut key_next = key.clone();
        match (pat_word, key_next.next()) {
            (None, None) => return true,
            (Some(p), Some(k)) if p == "*" || p == k => {
                pat = pat_next;
                key = key_next;
                continue;
            }
            _ => {}
        }
        // Mismatch: let the latest `#` swallow one more word, or fail.
        match &mut resume {
            Some((after_hash, hash_end)) => {
                if hash_end.next().is_none() {
                    return false;
                }
                pat = after_hash.clone();
                key = hash_end.clone();
            }
            None => return false,
        }
    }
}

type Words<'a> = std::str::Split<'a, char>;

/// The words of a topic key, RabbitMQ style: `""` has none.
fn words(s: &str) -> Words<'_> {
    let mut it = s.split('.');
    if s.is_empty() {
        // `"".split('.')` yields one empty word; RabbitMQ counts zero.
        it.next();
    }
    it
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward recursive reference over word lists.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((&p, rest)) => match key.split_first() {
                Some((&k, key_rest)) => (p == "*" || p == k) && reference(rest, key_rest),
                None => false,
            },
        }
    }

    fn split(s: &str) -> Vec<&str> {
        if s.is_empty() { Vec::new() } else { s.split('.').collect() }
    }

    #[test]
    fn examples_from_the_rabbitmq_tutorial() {
        assert!(topic_matches("*.orange.*", "quick.orange.rabbit"));
        assert!(topic_matches("*.*.rabbit", "quick.orange.rabbit"));
        assert!(topic_matches("lazy.#", "lazy.orange.male.rabbit"));
        assert!(!topic_matches("*.orange.*", "quick.orange.male.rabbit"));
        assert!(!topic_matches("*.orange.*", "orange"));
        assert!(!topic_matches("*.*.rabbit", "quick.brown.fox"));
    }

    #[test]
    fn edge_cases() {
        // The empty key has zero words.
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#.#", ""));
        assert!(topic_matches("", ""));
        assert!(!topic_matches("*", ""));
        assert!(!topic_matches("", "a"));
        assert!(!topic_matches("a", ""));
        // Trailing and leading dots make empty words.
        assert!(topic_matches("*", "a"));
        assert!(!topic_matches("*", "."));
        assert!(topic_matches("*.*", "."));
        assert!(topic_matches("a.*", "a."));
        assert!(!topic_matches("a", "a."));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(!topic_matches("a.#", "b"));
        assert!(topic_matches("#.a", "a"));
        assert!(topic_matches("#.a", "b.c.a"));
        assert!(!topic_matches("#.a", "a.b"));
        assert!(topic_matches("#.#", "a.b"));
        assert!(topic_matches("a.#.b", "a.b"));
        assert!(topic_matches("a.#.b", "a.x.y.b"));
        assert!(!topic_matches("a.#.b", "a.x.y"));
        assert!(topic_matches("#.*", "a"));
        assert!(!topic_matches("#.*", ""));
        assert!(topic_matches("*.#.*", "a.b"));
        assert!(!topic_matches("*.#.*", "a"));
        // Wildcards are whole words only, and never wildcards in the key.
        assert!(!topic_matches("a*", "ab"));
        assert!(!topic_matches("a", "*"));
        assert!(topic_matches("#", "#.*"));
    }

    fn word() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("*"), Just("#"), Just("")]
    }

    fn key_word() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("c"), Just("")]
    }

    fn key() -> impl Strategy<Value = String> {
        prop::collection::vec(key_word(), 0..6).prop_map(|w| w.join("."))
    }

    proptest! {
        #[test]
        fn agrees_with_reference(
            pat in prop::collection::vec(word(), 0..6).prop_map(|w| w.join(".")),
            key in key(),
        ) {
            prop_assert_eq!(
                topic_matches(&pat, &key),
                reference(&split(&pat), &split(&key)),
                "pattern {:?} key {:?}", pat, key
            );
        }

        #[test]
        fn a_key_matches_itself(key in key()) {
            prop_assert!(topic_matches(&key, &key));
        }

        #[test]
        fn hash_matches_everything(key in key()) {
            prop_assert!(topic_matches("#", &key));
        }

        #[test]
        fn star_replaces_any_word(words in prop::collection::vec(key_word(), 1..6), at in 0usize..6) {
            // [""] joins to "", which has zero words: no word to replace.
            prop_assume!(words.len() > 1 || !words[0].is_empty());
            let at = at % words.len();
            let mut pat = words.clone();
            pat[at] = "*";
            prop_assert!(topic_matches(&pat.join("."), &words.join(".")));
        }

        #[test]
        fn prefix_hash_matches_prefix_and_longer(tail in prop::collection::vec(key_word(), 0..5)) {
            let mut key = vec!["a"];
            key.extend(tail);
            prop_assert!(topic_matches("a.#", &key.join(".")));
            key[0] = "b";
            prop_assert!(!topic_matches("a.#", &key.join(".")));
        }
    }
}
