//! "Did you mean ...?": the closest known name by edit distance.

/// Edit distance between two strings, in characters: insertions, deletions, substitutions and transpositions of
/// neighbours ("trian" -> "train" is one edit), each counting 1 (optimal string alignment).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1).min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a plausible typo: at most a third of the
/// longer name's length (and at least 1, at most 3) edits, or `name` is a case variant or prefix of it.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        if c == name {
            continue;
        }
        let d = if c.to_lowercase() == lower { 0 } else { edit_distance(&lower, &c.to_lowercase()) };
        let limit = (name.chars().count().max(c.chars().count()) / 3).clamp(1, 3);
        let prefix = lower.len() >= 3 && c.to_lowercase().starts_with(&lower);
        if (d <= limit || prefix) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("trian", "train"), 1);
        assert_eq!(closest("trian", ["model", "train", "eval"]), Some("train"));
        assert_eq!(closest("assitant", ["system", "user", "assistant", "tool"]), Some("assistant"));
        assert_eq!(closest("lerning_rate", ["learning_rate", "warmup_steps"]), Some("learning_rate"));
        assert_eq!(closest("zzz", ["learning_rate"]), None);
        assert_eq!(closest("User", ["user", "tool"]), Some("user"));
        assert_eq!(closest("max_seq", ["max_seq_len", "packing"]), Some("max_seq_len"));
    }
}
