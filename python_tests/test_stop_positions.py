"""stop_positions and its incremental form against a brute-force search."""

from __future__ import annotations

import pytest
import torch
from conftest import device_backend_pairs, stop_positions_by_brute_force

from latro_engine import ops


def _first_completed(tokens: list[list[int]], stops: list[list[int]], start: int) -> list[int]:
    out = []
    for row in tokens:
        found = len(row)
        for step in range(start, len(row)):
            hits = [
                step + 1 - len(s)
                for s in stops
                if step + 1 - len(s) >= start and row[step + 1 - len(s) : step + 1] == s
            ]
            if hits:
                found = hits[0]
                break
        out.append(found)
    return out


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_hand_written_cases(device, backend, use_backend):
    use_backend(backend)
    tokens = torch.tensor(
        [
            [5, 1, 2, 3, 9, 9],  # [1, 2, 3] at 1
            [1, 2, 1, 2, 3, 0],  # overlapping prefix: [1, 2, 3] at 2
            [9, 9, 9, 9, 1, 2],  # incomplete at the end: none
            [9, 9, 9, 9, 9, 7],  # single-token stop at the very end
            [7, 9, 9, 9, 9, 9],  # at 0, but before start=1: ignored
        ],
        device=device,
    )
    stops = [[1, 2, 3], [7]]
    assert ops.stop_positions(tokens, stops).tolist() == [1, 2, 6, 5, 0]
    assert ops.stop_positions(tokens, stops, start=1).tolist() == [1, 2, 6, 5, 6]
    assert ops.stop_positions(tokens, stops, start=6).tolist() == [6] * 5


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("rows,length", [(1, 1), (7, 7), (97, 33), (5, 1025)])
def test_random_against_brute_force(device, backend, rows, length, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(rows * length)
    tokens = torch.randint(0, 4, (rows, length), generator=g)
    stops = [[3, 3, 3], [1, 2], [0, 0, 0, 0, 0]]
    for start in sorted({0, 1, length // 2, length}):
        out = ops.stop_positions(tokens.to(device), stops, start=start)
        assert out.tolist() == stop_positions_by_brute_force(tokens.tolist(), stops, start)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
@pytest.mark.parametrize("start", [0, 2])
def test_incremental_form_reports_first_completed_stop(device, backend, start, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(start)
    tokens = torch.randint(0, 4, (64, 40), generator=g).to(device)
    stops = ops.StopSequences([[1, 2, 3], [3], [2, 2]], device=device)
    positions = torch.full((64,), 40, dtype=torch.int64, device=device)
    for step in range(start, 40):
        positions = ops.stop_positions_step(
            tokens, stops, step=step, positions=positions, start=start
        )
    assert positions.tolist() == _first_completed(tokens.cpu().tolist(), stops.sequences, start)


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_incremental_form_keeps_stopped_rows(device, backend, use_backend):
    use_backend(backend)
    tokens = torch.tensor([[7, 7, 7], [1, 7, 1]], device=device)
    positions = torch.tensor([1, 3], device=device)
    out = ops.stop_positions_step(
        tokens, [[7]], step=torch.tensor(2, device=device), positions=positions
    )
    assert out.tolist() == [1, 3]  # row 0 had stopped at 1; row 1's newest token is no stop
    out = ops.stop_positions_step(
        tokens, [[7]], step=1, positions=torch.tensor([3, 3], device=device)
    )
    assert out.tolist() == [1, 1]


@pytest.mark.parametrize("device,backend", device_backend_pairs())
def test_empty_rows_and_non_contiguous(device, backend, use_backend):
    use_backend(backend)
    assert ops.stop_positions(
        torch.zeros(3, 0, dtype=torch.long, device=device), [[1]]
    ).tolist() == [0, 0, 0]
    tokens = torch.tensor(
        [[1, 2, 3, 4], [4, 3, 2, 1]], device=device
    ).t()  # rows [1, 4], [2, 3], [3, 2], [4, 1]
    assert ops.stop_positions(tokens, [[3]]).tolist() == [2, 1, 0, 2]
