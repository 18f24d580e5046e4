"""pnode/_petsc.py: the options manager; pnode/adjoint/distributed.py: cross-rank failures."""

import pytest
from petsc4py import PETSc

from pnode._petsc import inserted_options
from pnode.adjoint.distributed import raise_together


def test_inserted_options_leave_existing_values_and_remove_their_own():
    db = PETSc.Options()
    db.setValue("pnode_test_user", "cmdline")
    try:
        with inserted_options({"pnode_test_user": "default", "pnode_test_new": "3"}):
            assert db.getString("pnode_test_user") == "cmdline"  # the command line wins
            assert db.getString("pnode_test_new") == "3"
        assert db.getString("pnode_test_user") == "cmdline" and not db.hasName("pnode_test_new")
    finally:
        db.delValue("pnode_test_user")


def test_inserted_options_override_and_restore_even_after_an_error():
    db = PETSc.Options()
    db.setValue("pnode_test_lag", "100")
    try:
        with pytest.raises(RuntimeError), \
                inserted_options({"pnode_test_lag": "1", "pnode_test_absent": "x"}, override=True):
            assert db.getString("pnode_test_lag") == "1" and db.getString("pnode_test_absent") == "x"
            raise RuntimeError
        assert db.getString("pnode_test_lag") == "100" and not db.hasName("pnode_test_absent")
    finally:
        db.delValue("pnode_test_lag")


class _TwoRanks:
    """A stand-in communicator: this process is rank ``rank``; the other rank's report is given."""

    def __init__(self, rank, other):
        self.rank, self.other = rank, other

    def allgather(self, mine):
        return [mine, self.other] if self.rank == 0 else [self.other, mine]


def test_raise_together_failing_rank_raises_its_own_error_the_other_a_quote():
    own = ValueError("bad shard")
    with pytest.raises(ValueError, match="^bad shard$") as info:
        raise_together(_TwoRanks(1, (None, "p0")), own, lambda f: RuntimeError(f.message))
    assert info.value is own
    report = (("ValueError", "bad shard", 0.5), "p1")
    with pytest.raises(RuntimeError, match=r"^rank 1: ValueError: bad shard at 0.5$"):
        raise_together(_TwoRanks(0, report), None,
                       lambda f: RuntimeError(f"rank {f.rank}: {f.message} at {f.detail}"))
    assert raise_together(_TwoRanks(0, (None, "p1")), None, RuntimeError, payload="p0") == ["p0", "p1"]
