"""The benchmark's goal checks (`benchmark.py`): each goal reads its ratio from the right row."""

import benchmark
from benchmark import RankingRow, RetrievalRow, TrainingRow


def test_goals_read_each_ratio_from_its_row(capsys):
    ranking = [
        RankingRow(32, eager=9.0, jit=9.0, cached=1.0, second=1.0, flops=1.0, bound=0.1),
        # At 1,024: uncompiled 16x (met), compiled 7.5x (missed), 2.5x the bound (met).
        RankingRow(1024, eager=16.0, jit=7.5, cached=1.0, second=1.0, flops=1.0, bound=0.4),
    ]
    retrieval = [  # only the float32 corpus of 1,000,000 posts for 16 users counts: 3 reads
        RetrievalRow(1_000_000, 16, "bfloat16", "native", read=1.0, ours=1.0, xla=1.0, naive=1.0),
        RetrievalRow(1_000_000, 16, "float32", "native", read=1.0, ours=3.0, xla=1.0, naive=1.0),
    ]
    benchmark.print_goals(ranking, retrieval, None)
    assert capsys.readouterr().out.splitlines() == [
        "Goals:",
        "  [met ] rank 1,024: uncompiled dense / cached: 16.00x (goal 15.0x)",
        "  [MISS] rank 1,024: compiled dense / cached: 7.50x (goal 8.0x)",
        "  [met ] rank 1,024: cached / FLOP bound: 2.50x (goal 3.0x)",
        "  [MISS] top-100, 16 users, 1,000,000 posts: search / one read: 3.00x (goal 2.5x)",
        "  [n/a ] ranker training step / FLOP bound: not measured in this run",
    ]
    training = TrainingRow(64, 32, step=2.9, flops=1.0, bound=1.0)
    benchmark.print_goals([RankingRow(1024, None, 1.0, 1.0, 1.0, 1.0, 1.0)], [], training)
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  [n/a ] rank 1,024: uncompiled dense / cached: not measured in this run",
        "  [MISS] rank 1,024: compiled dense / cached: 1.00x (goal 8.0x)",
        "  [met ] rank 1,024: cached / FLOP bound: 1.00x (goal 3.0x)",
        "  [n/a ] top-100, 16 users, 1,000,000 posts: search / one read: not measured in this run",
        "  [met ] ranker training step / FLOP bound: 2.90x (goal 3.0x)",
    ]
