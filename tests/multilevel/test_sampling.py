"""pnode.multilevel.sampling: hybrid stochastic-deterministic batches."""

import pytest
import torch

from pnode.multilevel import BatchSchedule


def test_batches_of_an_epoch_are_disjoint():
    sched = BatchSchedule(10, 3, generator=torch.Generator().manual_seed(0))
    seen = torch.cat([sched.next() for _ in range(3)])
    assert seen.numel() == 9 and seen.unique().numel() == 9
    assert sched.epoch == 0
    sched.next()  # the ragged tail is dropped: a new epoch starts
    assert sched.epoch == 1


def test_batch_grows_on_stall_only_and_ends_deterministic():
    sched = BatchSchedule(16, 4, growth=2.0, stall_tol=0.1)
    # epoch-mean batch losses: 4 -> 2 (progress) -> 1.9 (stall: double to 8)
    # -> 1.0 (first epoch at 8 only sets the reference) -> 1.0 (stall: double to 16 = full)
    per_epoch = [4.0, 2.0, 1.9, 1.0, 1.0]
    sizes = []
    while True:
        idx = sched.next()
        if idx is None:
            break
        sizes.append(idx.numel())
        sched.record(per_epoch[sched.epoch])
    assert sizes == [4] * 12 + [8] * 4
    assert sched.deterministic and sched.batch_size == 16 and sched.epoch == 5
    sched.record(0.5)
    assert sched.epoch == 6  # every full-batch iteration is an epoch


def test_none_means_full_batch_and_bad_arguments():
    assert BatchSchedule(5, None).next() is None
    with pytest.raises(ValueError, match="empty"):
        BatchSchedule(0, 4)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        BatchSchedule(5, 0)
    with pytest.raises(ValueError, match="Invalid batch_growth"):
        BatchSchedule(5, 2, growth=1.0)
