import pytest
import torch

from prunekit.core.statistics import InputHessian, InputNorms


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
