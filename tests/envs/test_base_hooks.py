from __future__ import annotations

import pytest

from mmgym.envs.base import MMEnv


class _Unfinished(MMEnv):
    """A subclass that forgot its hooks."""


def test_missing_hooks_name_the_subclass_and_the_hook() -> None:
    env = _Unfinished()
    with pytest.raises(NotImplementedError, match=r"_Unfinished must define sample_task\(rng, index\)"):
        env.reset(seed=0)
    with pytest.raises(NotImplementedError, match=r"_Unfinished must define verify\(task, answer\)"):
        env.verify(None, "A")
    with pytest.raises(NotImplementedError, match=r"_Unfinished has no oracle: define oracle_action\(\)"):
        env.oracle_action()
