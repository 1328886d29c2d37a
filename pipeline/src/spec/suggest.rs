//! "Did you mean" suggestions and lists of valid choices.

use super::yaml::short;

/// The candidate closest to `word` by edit distance (adjacent transpositions count as one edit),
/// if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word_len = word.chars().count();
    if word_len == 0 || word_len > 64 {
        return None;
    }
    let max = match word_len {
        0..=2 => 0,
        3..=5 => 1,
        _ => 2,
    };
    let by_distance = candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= max && *d < c.chars().count())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    // A word cut short (`comp` for `compress`) is a likely typo too.
    by_distance.or_else(|| {
        (word_len >= 3)
            .then(|| candidates.iter().find(|c| c.starts_with(word)).copied())
            .flatten()
    })
}

/// Optimal string alignment distance.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// `unknown stage kind `zsdt` (did you mean `zstd`?); valid kinds: image, full, zstd`.
pub(crate) fn unknown(what: &str, word: &str, valid: &str, candidates: &[&str]) -> String {
    let mut message = format!("unknown {what} `{}`", short(word));
    if let Some(c) = closest(word, candidates) {
        message.push_str(&format!(" (did you mean `{c}`?)"));
    }
    if candidates.is_empty() {
        message.push_str(&format!("; there are no valid {valid}"));
    } else {
        message.push_str(&format!("; valid {valid}: {}", candidates.join(", ")));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_typos_only() {
        assert_eq!(closest("zsdt", &["image", "zstd", "dedup"]), Some("zstd"));
        assert_eq!(closest("levl", &["level", "workers"]), Some("level"));
        assert_eq!(closest("compress", &["image", "zstd"]), None);
        assert_eq!(closest("ab", &["ac"]), None);
        assert_eq!(closest("clean", &["cleanup"]), Some("cleanup"));
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
