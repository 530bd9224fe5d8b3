//! The CLI's tables: columns as wide as their widest cell (header
//! included), so every row lines up whatever the values; numbers right
//! aligned; the last column unpadded.

/// How a column's cells sit in it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Align {
    Left,
    Right,
}

/// The table as text, one line per row, header first.
pub fn render(header: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut width: Vec<usize> = header.iter().map(|(h, _)| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == n;
            match header[i].1 {
                Align::Right => {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
                Align::Left if last => s.push_str(c),
                Align::Left => {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                s.push_str("  ");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.iter().map(|(h, _)| *h).collect());
    for r in rows {
        out.push_str(&line(
            (0..n)
                .map(|i| r.get(i).map_or("", |c| c.as_str()))
                .collect(),
        ));
    }
    out
}

/// Print [`render`]'s table.
pub fn print(header: &[(&str, Align)], rows: &[Vec<String>]) {
    print!("{}", render(header, rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every column starts (left) or ends (right) at the same place in the
    /// header and in every row, however long a value is.
    #[test]
    fn columns_line_up_whatever_the_values() {
        let h = [
            ("IMAGE", Align::Left),
            ("VCPUS", Align::Right),
            ("REFILL", Align::Left),
            ("IDLE VMS", Align::Left),
        ];
        let rows = vec![
            vec!["default".into(), "1".into(), "clone".into(), "a b".into()],
            vec![
                "a-much-longer-image-name".into(),
                "16".into(),
                "cold boot".into(),
                "-".into(),
            ],
        ];
        let t = render(&h, &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        // Left columns: each cell starts where its header does.
        for (head, cells) in [
            ("REFILL", ["clone", "cold boot"]),
            ("IDLE VMS", ["a b", "-"]),
        ] {
            let at = lines[0].find(head).unwrap();
            for (l, c) in lines[1..].iter().zip(cells) {
                assert!(
                    l[at..].starts_with(c) && l.as_bytes()[at - 1] == b' ',
                    "{t}"
                );
            }
        }
        // The right-aligned column ends where its header ends.
        let vcpus_end = lines[0].find("VCPUS").unwrap() + 5;
        assert_eq!(&lines[1][vcpus_end - 1..vcpus_end], "1", "{t}");
        assert_eq!(&lines[2][vcpus_end - 2..vcpus_end], "16", "{t}");
        // No trailing spaces; the last column is not padded.
        assert!(t.lines().all(|l| !l.ends_with(' ')), "{t:?}");
        assert!(lines[1].ends_with("a b"));
    }
}
