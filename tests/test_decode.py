"""decode.py's pure helpers (the generation loop itself is tested against transformers in test_exactness.py)."""

from __future__ import annotations

from vismmoe.step.decode import cut_at_eos


def test_cut_at_eos_keeps_or_drops_the_first_eos():
    eos = {7, 9}
    assert cut_at_eos([1, 2, 9, 3, 7], eos) == [1, 2, 9]                 # the first EOS ends the row
    assert cut_at_eos([1, 2, 9, 3, 7], eos, keep_eos=False) == [1, 2]
    assert cut_at_eos([7, 1], eos) == [7] and cut_at_eos([7, 1], eos, keep_eos=False) == []
    assert cut_at_eos([1, 2, 3], eos) == [1, 2, 3] == cut_at_eos([1, 2, 3], eos, keep_eos=False)
    assert cut_at_eos([], eos) == [] and cut_at_eos([1, 9], set()) == [1, 9]
