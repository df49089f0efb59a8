"""lib.progress: every long loop takes a flag or the caller's own bar."""

import io

from tqdm import tqdm

from lib.progress import progress_bar


def test_a_flag_makes_and_closes_a_bar_and_a_callers_bar_is_advanced_and_left_open(capsys):
    with progress_bar(False, 3, "x") as bar:
        assert bar is None
    with progress_bar(None, 3, "x") as bar:
        assert bar is None
    with progress_bar(True, 3, "made here", unit="img") as bar:
        bar.update(3)
        made = bar
    assert made.n == 3 and made.total == 3 and made.disable  # closed on exit (tqdm disables a closed bar)
    assert "made here" in capsys.readouterr().err  # drawn on stderr
    mine = tqdm(total=10, file=io.StringIO())
    with progress_bar(mine, 3, "ignored") as bar:
        assert bar is mine
        bar.update(2)
    mine.update(1)  # still open: the caller's bar goes on over the next call
    assert mine.n == 3 and not mine.disable
    mine.close()


def test_generation_and_token_helpers_take_either_kind():
    import torch

    from lib.progress import track
    from lib.sampling import generate_all
    from lib.twins import build_twin

    pipe = build_twin("sd-v1")
    outer = tqdm(total=100, file=io.StringIO())
    imgs = generate_all(pipe, ["a cat", "a dog"], [0, 1], steps=1, guidance=2.0, batch_size=3, progress=outer)
    assert outer.n == 4 and imgs.shape[0] == 4
    again = generate_all(pipe, ["a cat", "a dog"], [0, 1], steps=1, guidance=2.0, batch_size=3, progress=True)
    torch.testing.assert_close(again, imgs)  # a bar changes nothing but the display
    assert list(track(range(3), outer, "t")) == [0, 1, 2] and outer.n == 7
    assert list(track(range(3), False, "t")) == [0, 1, 2]
