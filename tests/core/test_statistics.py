import pytest
import torch

from prunekit.core.statistics import InputHessian, InputNorms, TwinInputHessian


def test_norms_and_hessian_match_direct_computation():
    torch.manual_seed(0)
    batches = [torch.randn(3, 5, 7) for _ in range(4)]
    norms, hessian = InputNorms(7), InputHessian(7)
    for batch in batches:
        norms.add(batch)
        hessian.add(batch)
    x = torch.cat([b.reshape(-1, 7) for b in batches])
    assert norms.rows == hessian.rows == 60
    torch.testing.assert_close(norms.norms(), x.norm(dim=0))
    torch.testing.assert_close(hessian.norms(), x.norm(dim=0))
    torch.testing.assert_close(hessian.hessian(), 2 * x.T @ x / 60)


def test_hessian_is_a_fresh_tensor():
    hessian = InputHessian(3)
    hessian.add(torch.randn(4, 3))
    h = hessian.hessian()
    h.zero_()
    assert hessian.gram.abs().sum() > 0


def test_triangular_and_symmetric_storage_agree_and_merge():
    torch.manual_seed(1)
    a, b = torch.randn(40, 9), torch.randn(30, 9)
    fast, plain = InputHessian(9), InputHessian(9)
    plain.upper_only = False
    fast.add(a)
    plain.add(a)
    torch.testing.assert_close(fast.hessian(), plain.hessian())
    other = InputHessian(9)
    other.add(b)
    fast.merge_(other)
    plain.merge_(other)
    expected = 2 * torch.cat([a, b]).T @ torch.cat([a, b]) / 70
    torch.testing.assert_close(fast.hessian(), expected)
    torch.testing.assert_close(plain.hessian(), expected)


def test_scipy_blas_follows_torch_threads_so_the_environment_cannot_change_the_hessian():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = InputHessian(16)
            stats.add(torch.randn(2, 8, 16))
            if not stats.upper_only:
                pytest.skip("scipy's ssyrk is not in use")
            blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
            assert blas and all(info["num_threads"] == threads for info in blas)
    finally:
        torch.set_num_threads(previous)


def test_twin_statistics_without_a_shift_leave_the_weight_as_it_is():
    x = torch.randn(3, 10, 8, generator=torch.Generator().manual_seed(0))
    twin = TwinInputHessian(8)
    twin.add_pair(x, x.clone())
    twin.add(x)
    weight = torch.randn(5, 8)
    assert twin.rows == 60 and not twin.shift.any()
    assert twin.dense_output_weight(weight, 0.01) is weight
    plain = InputHessian(8)
    plain.add(x)
    plain.add(x)
    torch.testing.assert_close(twin.gram_matrix(), plain.gram_matrix())


def test_the_dense_output_weight_is_the_least_squares_fit_to_the_dense_outputs():
    """W* minimises ‖X_d Wᵀ − X Mᵀ‖ over M: the pruned model's inputs X reproduce the dense model's outputs."""
    generator = torch.Generator().manual_seed(1)
    dense_inputs = torch.randn(400, 12, generator=generator, dtype=torch.float64)
    # the pruned model's inputs: a distortion of the dense ones that a linear layer can undo, plus noise it cannot
    distortion = torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=generator, dtype=torch.float64)
    inputs = dense_inputs @ distortion + 0.01 * torch.randn(400, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    twin = TwinInputHessian(12)
    for rows in (slice(0, 150), slice(150, 400)):
        twin.add_pair(inputs[rows].float(), dense_inputs[rows].float())
    fitted = twin.dense_output_weight(weight.float(), 1e-9).double()
    best = torch.linalg.lstsq(inputs, dense_inputs @ weight.T).solution.T
    torch.testing.assert_close(fitted, best, rtol=1e-3, atol=1e-3)
    error = lambda m: float((dense_inputs @ weight.T - inputs @ m.T).square().sum())  # noqa: E731
    assert error(fitted) < 0.01 * error(weight)


def test_twin_statistics_merge_both_sums():
    generator = torch.Generator().manual_seed(2)
    x, d = torch.randn(2, 20, 6, generator=generator), torch.randn(2, 20, 6, generator=generator)
    whole, first, second = TwinInputHessian(6), TwinInputHessian(6), TwinInputHessian(6)
    for batch in range(2):
        whole.add_pair(x[batch], d[batch])
    first.add_pair(x[0], d[0])
    second.add_pair(x[1], d[1])
    first.merge_(second)
    assert first.rows == whole.rows and len(first.accumulators()) == 2
    torch.testing.assert_close(first.shift, whole.shift)
    torch.testing.assert_close(first.gram_matrix(), whole.gram_matrix())
