//! Stop strings over streamed text.
//!
//! Generated text arrives in pieces (one per token) and a stop string may straddle pieces. A
//! [`StopMatcher`] is fed the pieces and returns the text that is safe to show now: everything except
//! a trailing part that could still turn into a stop string. When a stop string appears, the text
//! before it is released, the stop string and anything after it are dropped, and the matcher reports
//! which stop string it was. When generation ends for another reason, [`StopMatcher::finish`]
//! releases whatever was held back.

/// What one [`StopMatcher::push`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutput {
    /// Text that is safe to print now.
    pub text: String,
    /// `Some(i)` when stop string `i` was found: generation should end, `text` is the last output.
    pub stopped: Option<usize>,
}

/// Finds stop strings in a stream of text pieces; see the module documentation.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        StopMatcher {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: None,
        }
    }

    pub fn stop_strings(&self) -> &[String] {
        &self.stops
    }

    /// The stop string index once one has been found.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Feeds one piece. After a stop, further pieces are ignored and produce nothing.
    pub fn push(&mut self, piece: &str) -> StopOutput {
        if self.stopped.is_some() {
            return StopOutput {
                text: String::new(),
                stopped: self.stopped,
            };
        }
        self.held.push_str(piece);

        // The earliest occurrence of any stop string wins; at equal positions, the first listed.
        let mut hit: Option<(usize, usize)> = None;
        for (i, s) in self.stops.iter().enumerate() {
            if let Some(pos) = self.held.find(s.as_str()) {
                if hit.is_none_or(|(p, _)| pos < p) {
                    hit = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = hit {
            self.held.truncate(pos);
            self.stopped = Some(i);
            return StopOutput {
                text: std::mem::take(&mut self.held),
                stopped: Some(i),
            };
        }

        // Hold back the longest suffix that is a proper prefix of some stop string.
        let keep = self.longest_partial_suffix();
        let tail = self.held.split_off(self.held.len() - keep);
        StopOutput {
            text: std::mem::replace(&mut self.held, tail),
            stopped: None,
        }
    }

    /// Ends the stream without a stop: returns the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn longest_partial_suffix(&self) -> usize {
        let h = self.held.as_bytes();
        let mut best = 0;
        for s in &self.stops {
            let s = s.as_bytes();
            // A full match was handled by the caller, so only proper prefixes can be pending.
            let max = (s.len() - 1).min(h.len());
            for k in (best + 1..=max).rev() {
                if self.held.is_char_boundary(h.len() - k) && h[h.len() - k..] == s[..k] {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, Option<usize>, String) {
        let mut m = StopMatcher::new(stops.iter().copied());
        let mut out = Vec::new();
        let mut stopped = None;
        for p in pieces {
            let o = m.push(p);
            out.push(o.text);
            if o.stopped.is_some() {
                stopped = o.stopped;
                break;
            }
        }
        (out, stopped, m.finish())
    }

    #[test]
    fn split_across_pieces() {
        let (out, stopped, rest) = run(&["</s>"], &["Hello <", "/", "s> world"]);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert_eq!(stopped, Some(0));
        assert_eq!(rest, "");
    }

    #[test]
    fn false_start_is_released() {
        let (out, stopped, rest) = run(&["</s>"], &["a <", "/x", "y"]);
        assert_eq!(out, vec!["a ", "</x", "y"]);
        assert_eq!(stopped, None);
        assert_eq!(rest, "");
    }

    #[test]
    fn held_text_released_at_finish() {
        let (out, stopped, rest) = run(&["STOP"], &["abc", "ST"]);
        assert_eq!(out, vec!["abc", ""]);
        assert_eq!(stopped, None);
        assert_eq!(rest, "ST");
    }

    #[test]
    fn earliest_stop_wins_and_rest_dropped() {
        let (out, stopped, _) = run(&["world", "lo"], &["hello world"]);
        assert_eq!(out, vec!["hel"]);
        assert_eq!(stopped, Some(1));
    }

    #[test]
    fn stop_inside_one_piece_with_text_after() {
        let (out, stopped, _) = run(&["\n\n"], &["one\n", "\ntwo"]);
        assert_eq!(out, vec!["one", ""]);
        assert_eq!(stopped, Some(0));
    }

    #[test]
    fn overlapping_prefixes_hold_the_longest() {
        // "aab": after "xaa", both "a" and "aa" are prefixes; the longer one must be held.
        let mut m = StopMatcher::new(["aab"]);
        assert_eq!(m.push("xaa").text, "x");
        let o = m.push("b!");
        assert_eq!(o.text, "");
        assert_eq!(o.stopped, Some(0));
    }

    #[test]
    fn multibyte_text() {
        let (out, stopped, _) = run(&["é!"], &["café", "!"]);
        assert_eq!(out, vec!["caf", ""]);
        assert_eq!(stopped, Some(0));
        let (out, stopped, rest) = run(&["ü"], &["naïve"]);
        assert_eq!(out, vec!["naïve"]);
        assert_eq!((stopped, rest.as_str()), (None, ""));
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, stopped, rest) = run(&[""], &["a", "b"]);
        assert_eq!(out, vec!["a", "b"]);
        assert_eq!((stopped, rest.as_str()), (None, ""));
    }

    #[test]
    fn pushes_after_stop_are_ignored() {
        let mut m = StopMatcher::new(["x"]);
        assert_eq!(m.push("ax").stopped, Some(0));
        let o = m.push("more");
        assert_eq!(o.text, "");
        assert_eq!(o.stopped, Some(0));
    }
}
