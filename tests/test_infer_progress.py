"""Progress lines of the editing commands (asset_dist/infer/progress.py): in place on a terminal, one line per
10 % (and at the end) in logs; the token total is extrapolated until every edit is read."""
from __future__ import annotations

import io

from asset_dist.infer.progress import Progress


def test_log_lines_every_tenth_and_at_the_end():
    out = io.StringIO()
    p = Progress("[rank 0] sampling", 4, stream=out, tty=False)
    p.queued(100)  # 1 of 4 edits read: total ~400
    for _ in range(10):
        p.sampled(10)
    assert "1/4" not in out.getvalue()  # no edit done yet
    first = out.getvalue().splitlines()
    assert len(first) == 2 and "tokens 80/~400 (20%)" in first[-1]  # the 10 % and 20 % marks
    p.queued(300, 3)
    for _ in range(30):
        p.sampled(10)
    p.edit_done(4)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and all(line.startswith("[rank 0] sampling: ") for line in lines)  # 10 marks + end
    assert "4/4 edits, tokens 400/400 (100%)" in lines[-1] and "ETA 0:00:00" in lines[-1]
    p.close()  # closing twice prints nothing more
    assert len(out.getvalue().splitlines()) == 11


def test_terminal_redraws_one_line():
    out = io.StringIO()
    p = Progress("edit", 1, stream=out, tty=True, interval=0.0)
    p.queued(50)
    for _ in range(5):
        p.sampled(10)
    p.edit_done()
    p.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 7 and text.count("\n") == 1  # redrawn in place, one newline at the end
    assert "1/1 edits, tokens 50/50 (100%)" in text.splitlines()[-1]


def test_no_tokens_counts_edits():
    out = io.StringIO()
    p = Progress("guides", 2, stream=out, tty=False, every=0.5)
    p.queued(0, 2)
    p.edit_done()
    p.edit_done()
    p.close()
    assert out.getvalue().splitlines()[-1].startswith("guides: 2/2 edits, tokens 0/0 (100%)")
