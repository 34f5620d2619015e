"""A batched finite-Newton Exemplar-SVM solver in torch (CPU or CUDA, float32).

It solves exactly the reference objective (see :mod:`attribution.esvm.base`) for many
targets at once. The squared hinge loss is piecewise quadratic, so the problem is a
regularised least-squares problem once the set A of margin violators is known. The
finite Newton method (Keerthi & DeCoste, JMLR 2005) alternates:

1. A = points with positive hinge residual at the current iterate,
2. solve the least-squares problem restricted to A exactly (a linear system),
3. exact line search on the true (piecewise quadratic) objective towards that solution,

and terminates finitely at the exact optimum; in practice in 4-10 iterations. Only
10-30% of the negatives are in A at the optimum, so step 2 only touches those rows
(the "shrinking" of the working set comes for free), while steps 1 and 3 look at all
negatives, so the KKT conditions are verified on the full set at every iteration.
The first iterate is the all-points-active least-squares solution.

Two equivalent forms of step 2, chosen by ``form='auto'``:

- "primal" (d+1 small relative to N, e.g. 128-d embeddings and 6000 negatives): the
  (d+1)x(d+1) system  (I + 2 sum_A c_j z_j z_j^T) v = 2 sum_A c_j y_j z_j.  Its matrix is
  kept per target and updated only by the rows that enter or leave A (rank-k updates),
  so later iterations cost |change of A| * d^2 rather than |A| * d^2.
- "kernel" (d large relative to N, e.g. 2048-d ImageNet features and 1300 negatives):
  v = sum_A beta_j z_j with  (K_AA + diag(1/(2 c_j))) beta = y_A,  where K = Z Z^T is
  the Gram matrix of the augmented negatives, computed once and shared by all targets.

Targets are processed in chunks; finished targets leave the chunk. Convergence is
judged per target on the full gradient: ||grad f(v)|| <= tol * ||grad f(0)||, or the
active set is stable after a full Newton step (then v is the exact optimum).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
# At module level: imported inside threadpool_limits (the first solve) LAPACK would load
# with all threads and give that first call slightly different sums than later ones.
from scipy.linalg import lapack

from .base import ESVMSolver, balanced_costs

FORMS = ("auto", "primal", "kernel")


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use device='cpu' or None (auto)")
    return dev


def _line_search(r, rho, c, vd, dd, max_steps: int = 40):
    """Exact minimiser over s >= 0 of  vd*s + dd*s^2/2 + sum_j c_j max(0, r_j + s rho_j)^2.

    That is f(v + s*Delta) - f(v) for the ESVM objective with residuals r (T, P), their
    rate of change rho (T, P), costs c (broadcastable to (T, P)), vd = v.Delta and
    dd = Delta.Delta (T,). The derivative is piecewise linear and increasing, so a
    bracketed Newton iteration on it ends at the exact root within a few steps.
    Points active for every s >= 0 (r > 0, rho >= 0) enter through two sums and points
    inactive for every s >= 0 (r <= 0, rho <= 0) drop out; only the few that cross the
    margin along the line are iterated over (the full (T, N) arrays once, not per step).
    Returns (s, descent) where descent is False for targets whose direction is not a
    descent direction (rounding level), which then keep s = 0.
    """
    T = r.shape[0]
    c = c.expand_as(r)
    pos0 = r > 0
    always = pos0 & (rho >= 0)
    a1 = vd + 2 * torch.where(always, c * rho * r, 0).sum(1)      # f'(s) = a1 + s*b1 + crossing terms
    b1 = dd + 2 * torch.where(always, c * rho * rho, 0).sum(1)
    down = pos0 & (rho < 0)
    # crossing points that enter the margin beyond an upper bound of the minimiser never
    # matter: f'(s) >= a1 + s*b1 + sum_down 2 c r rho, so s* <= s_ub
    s_ub = -(a1 + 2 * torch.where(down, c * rho * r, 0).sum(1)) / b1.clamp_min(1e-30)
    up = ~pos0 & (rho > 0) & (-r < s_ub[:, None] * rho)
    cross = down | up
    idx, valid = _padded_indices(cross)
    rc, pc = r.gather(1, idx), rho.gather(1, idx)
    cc = c.gather(1, idx) * valid
    lo = torch.zeros(T, dtype=r.dtype, device=r.device)
    hi = torch.full_like(lo, math.inf)
    fp0 = a1 + 2 * (cc * rc.clamp_min(0) * pc).sum(1)
    descent = fp0 < 0
    s = torch.ones_like(lo)
    scale = fp0.abs()
    for _ in range(max_steps):
        q = rc + s[:, None] * pc
        fp = a1 + s * b1 + 2 * (cc * q.clamp_min(0) * pc).sum(1)
        fpp = b1 + 2 * (cc * (q > 0) * pc * pc).sum(1)
        done = (fp.abs() <= 1e-6 * scale) | ~descent
        if bool(done.all()):
            break
        lo = torch.where(fp < 0, s, lo)
        hi = torch.where(fp > 0, s, hi)
        sn = s - fp / fpp.clamp_min(1e-30)
        outside = (sn <= lo) | (sn >= hi) | ~torch.isfinite(sn)
        bisect = torch.where(torch.isinf(hi), 2 * s, (lo + hi) / 2)
        s = torch.where(done, s, torch.where(outside, bisect, sn))
    return torch.where(descent, s, torch.zeros_like(s)), descent


def _fixpoint(s, dlt, o, rtol: float = 1e-6):
    """Targets whose last step moved no decision value by more than rtol * (1 + max |o|).

    In float32 the gradient cannot always be pushed below tol (rounding in the margins of
    thousands of points); once Newton steps stop changing the decision values the
    iterate is a numerical fixpoint and further iterations cannot improve it.
    """
    return (s[:, None] * dlt).abs().amax(1) <= rtol * (1 + o.abs().amax(1))


def _padded_indices(mask: torch.Tensor):
    """Indices of the True entries of each row of ``mask`` (T, N), padded to the row max.

    Returns (idx (T, K), valid (T, K) bool), indices ascending. Padding points at index 0
    with valid False. O(N) per row (a cumulative count and a scatter), no sort.
    """
    T, N = mask.shape
    counts = mask.sum(1)
    k = int(counts.max()) if mask.numel() else 0
    pos = torch.where(mask, mask.cumsum(1) - 1, k)      # slot of each True entry; k = discard
    out = torch.zeros(T, k + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, pos, torch.arange(N, device=mask.device).expand(T, N))
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, out[:, :k], 0), valid


def _kernel_newton_cpu(K, kt, ktt, mask, res, off, dinv):
    """Kernel-form Newton corrections, one LAPACK ?posv per target (CPU).

    For target j with active negatives A (and the target itself when it violates its own
    margin, bordered last) solve (K_AA + D_A) d_A = res_A; inactive points get off (= -beta).
    Exact-size systems (no padding) and LAPACK's in-place Cholesky+solve: torch's batched
    cholesky spends as long zeroing the upper triangle as factorising.
    """
    n = K.shape[0]
    Kn, ktn, kttn = K.numpy(), kt.numpy(), ktt.numpy()
    maskn, resn, dinvn = mask.numpy(), res.numpy(), dinv.numpy()
    posv = lapack.sposv if Kn.dtype == np.float32 else lapack.dposv
    out = off.numpy().copy()
    for j in range(len(maskn)):
        ia = np.flatnonzero(maskn[j, :n])
        t_on = bool(maskn[j, n])
        p = len(ia) + t_on
        M = np.empty((p, p), dtype=Kn.dtype, order="F")
        M[:len(ia), :len(ia)] = Kn[np.ix_(ia, ia)]
        M[np.arange(len(ia)), np.arange(len(ia))] += dinvn[0]
        rhs = np.empty(p, dtype=Kn.dtype)
        rhs[:len(ia)] = resn[j, ia]
        if t_on:
            M[-1, :-1] = M[:-1, -1] = ktn[j, ia]
            M[-1, -1] = kttn[j] + dinvn[n]
            rhs[-1] = resn[j, n]
        if p == 0:
            continue
        _, x, info = posv(M, rhs, lower=1, overwrite_a=1, overwrite_b=1)
        if info != 0:
            raise FloatingPointError("BatchedESVM kernel form: a Newton system is not positive "
                                     "definite in this precision; use dtype=torch.float64")
        out[j, ia] += x[:len(ia)]
        if t_on:
            out[j, n] += x[-1]
    return torch.from_numpy(out)


def _kernel_newton_batched(K, kt_l, ktt_l, new_mask, res, off, dinv):
    """Kernel-form Newton corrections for all targets at once (for CUDA): systems padded to
    the largest active count, padding rows identity, the target bordered last."""
    n = K.shape[0]
    dev, dt = K.device, K.dtype
    idx, valid = _padded_indices(new_mask[:, :n])
    Lt, P = idx.shape
    vm = valid.to(dt)
    tact = new_mask[:, n].to(dt)                    # the target violates its own margin
    M = torch.empty(Lt, P + 1, P + 1, dtype=dt, device=dev)
    for j in range(Lt):                             # row copies; a 3-D fancy gather is slower
        M[j, :P, :P] = K.index_select(0, idx[j]).index_select(1, idx[j])
    M[:, :P, :P] *= vm[:, :, None] * vm[:, None, :]
    kA = kt_l.gather(1, idx) * vm * tact[:, None]
    M[:, P, :P] = kA
    M[:, :P, P] = kA
    M[:, P, P] = torch.where(tact > 0, ktt_l + dinv[n], torch.ones_like(ktt_l))
    M.diagonal(dim1=1, dim2=2)[:, :P].add_(torch.where(valid, dinv[0], torch.ones((), dtype=dt, device=dev)))
    Lc, info = torch.linalg.cholesky_ex(M)
    if bool((info > 0).any()):
        raise FloatingPointError("BatchedESVM kernel form: a Newton system is not positive "
                                 "definite in this precision; use dtype=torch.float64")
    rhs = torch.cat([res.gather(1, idx) * vm, (res[:, n] * tact)[:, None]], 1)
    sol = torch.cholesky_solve(rhs[:, :, None], Lc)[:, :, 0]
    dbeta = off.scatter_add(1, idx, sol[:, :P] * vm)  # add: padding slots carry 0
    dbeta[:, n] += sol[:, P] * tact
    return dbeta


class BatchedESVM(ESVMSolver):
    """Many targets' ESVMs at once by a batched finite Newton method (torch).

    Parameters
    ----------
    C : the reference's C (0.1); class weights are sklearn's 'balanced'.
    tol : relative gradient tolerance, ||grad f(v)|| <= tol * ||grad f(0)||, checked on
        all negatives. float32 arithmetic bottoms out near 1e-6.
    max_iter : Newton iterations per target (typically 4-10 are used).
    form : "auto", "primal" ((d+1)-sized systems) or "kernel" (|A|-sized systems over a
        shared Gram matrix); "auto" picks kernel when d+1 > N/2.
    device : "cpu", "cuda", "cuda:1", or None for CUDA when available.
    batch_size : targets solved together (bounds memory: primal keeps a (d+1)^2 matrix
        per target, kernel a |A|^2 one).
    num_threads : torch intra-op threads during the call (None: leave torch's setting).
    """

    name = "batched"

    def __init__(self, C: float = 0.1, tol: float = 1e-6, max_iter: int = 50, form: str = "auto",
                 device=None, batch_size: int = 128, num_threads: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(C)
        if not (tol > 0):
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if num_threads is not None and not (isinstance(num_threads, int) and num_threads >= 1):
            raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.tol, self.max_iter, self.form = float(tol), max_iter, form
        self.device = _resolve_device(device)
        self.batch_size, self.num_threads, self.dtype = batch_size, num_threads, dtype
        self.info_: dict = {}

    def get_params(self) -> dict:
        return {"C": self.C, "tol": self.tol, "max_iter": self.max_iter, "form": self.form,
                "device": str(self.device), "batch_size": self.batch_size,
                "num_threads": self.num_threads, "dtype": str(self.dtype).replace("torch.", "")}

    # Newton systems: exact-size per-target loops on CPU (LAPACK, no padding waste), or all
    # targets padded to the largest active set in one batched call (CUDA, where per-target
    # launches would dominate). None: decided by the device; tests force the padded path.
    _use_padded: bool | None = None

    def _padded(self) -> bool:
        return self.device.type != "cpu" if self._use_padded is None else self._use_padded

    # ------------------------------------------------------------------ entry

    def _decision_values(self, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        old_threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.no_grad():
                return self._solve(targets, negatives)
        finally:
            if self.num_threads is not None:
                torch.set_num_threads(old_threads)

    def _solve(self, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        n, d = negatives.shape
        form = self.form
        if form == "auto":
            form = "kernel" if d + 1 > n / 2 else "primal"
        c_pos, c_neg = balanced_costs(self.C, n)
        dev, dt = self.device, self.dtype
        ones = lambda m: torch.ones(m, 1, dtype=dt, device=dev)  # noqa: E731
        # z = [x; intercept_scaling=1]: the intercept is a regularised weight, as in liblinear
        Z = torch.cat([torch.as_tensor(negatives, device=dev).to(dt), ones(n)], 1)
        Zt_all = torch.cat([torch.as_tensor(targets, device=dev).to(dt), ones(len(targets))], 1)
        out = np.empty((len(targets), n), dtype=np.float32)
        iters, rel_grad, unconverged = [], [], 0
        if form == "primal":
            shared = self._primal_shared(Z, c_neg)
            step = self.batch_size
            # keep the per-target (d+1)^2 matrices within ~256 MB
            step = max(1, min(step, (256 << 20) // (4 * (d + 1) ** 2)))
        else:
            shared = self._kernel_shared(Z, c_neg)
            step = self.batch_size      # CPU: systems are built one target at a time
            if self._padded():          # padded (T, |A|, |A|) systems: keep them within ~256 MB
                step = max(1, min(step, (256 << 20) // (4 * (n + 2) ** 2)))
        for start in range(0, len(targets), step):
            Zt = Zt_all[start:start + step]
            if form == "primal":
                o, it, rg, ok = self._solve_primal(Z, Zt, shared, c_pos, c_neg)
            else:
                o, it, rg, ok = self._solve_kernel(Z, Zt, shared, c_pos, c_neg)
            out[start:start + len(Zt)] = o.float().cpu().numpy()
            iters.append(it.cpu())
            rel_grad.append(rg.cpu())
            unconverged += int((~ok).sum())
        iters = torch.cat(iters)
        rel_grad = torch.cat(rel_grad)
        self.info_ = {"form": form, "targets": len(targets), "negatives": n, "dim": d,
                      "mean_iterations": float(iters.float().mean()), "max_iterations": int(iters.max()),
                      "max_relative_gradient": float(rel_grad.max()), "unconverged": unconverged}
        if unconverged:
            warnings.warn(f"BatchedESVM: {unconverged} of {len(targets)} targets did not reach "
                          f"tol={self.tol} in max_iter={self.max_iter} (largest relative gradient "
                          f"{float(rel_grad.max()):.2e}); raise max_iter or use dtype=torch.float64",
                          RuntimeWarning, stacklevel=3)
        return out

    # ------------------------------------------------------------------ primal form

    @staticmethod
    def _primal_shared(Z, c_neg):
        D = Z.shape[1]
        eye = torch.eye(D, dtype=Z.dtype, device=Z.device)
        # all negatives active: I + 2 c_neg Z^T Z, shared by every target's first iterate
        return {"H0": eye + 2 * c_neg * (Z.T @ Z), "eye": eye, "colsum": Z.sum(0)}

    def _solve_primal(self, Z, Zt, shared, c_pos, c_neg):
        T, D = Zt.shape
        n = Z.shape[0]
        dev, dt = Z.device, Z.dtype
        # per-target state; the all-active start: every negative and the target in A
        H = shared["H0"].expand(T, D, D) + 2 * c_pos * Zt[:, :, None] * Zt[:, None, :]
        mask = torch.ones(T, n, dtype=torch.bool, device=dev)
        tmask = torch.ones(T, dtype=torch.bool, device=dev)
        v = torch.zeros(T, D, dtype=dt, device=dev)
        g0 = (2 * c_neg * shared["colsum"] - 2 * c_pos * Zt).norm(dim=1)  # ||grad f(0)||
        live = torch.arange(T, device=dev)
        iters = torch.zeros(T, dtype=torch.long, device=dev)
        rel = torch.full((T,), math.inf, dtype=dt, device=dev)
        ok = torch.zeros(T, dtype=torch.bool, device=dev)
        full_step = torch.zeros(T, dtype=torch.bool, device=dev)
        still = torch.zeros(T, dtype=torch.bool, device=dev)
        first = True
        for it in range(self.max_iter + 1):
            zt, vv = Zt[live], v[live]
            o = vv @ Z.T                                  # decision values of all negatives
            ot = (vv * zt).sum(1)
            r, rt = 1 + o, 1 - ot                         # hinge residuals (y=-1 / y=+1)
            rp, rtp = r.clamp_min(0), rt.clamp_min(0)
            grad = vv + 2 * c_neg * (rp @ Z) - 2 * c_pos * rtp[:, None] * zt
            rel[live] = grad.norm(dim=1) / g0[live]
            new_mask, new_t = r > 0, rt > 0
            stable = (new_mask == mask[live]).all(1) & (new_t == tmask[live]) & full_step[live]
            done = ((rel[live] <= self.tol) | stable | still[live]) & torch.tensor(not first, device=dev)
            ok[live[done]] = True
            if bool(done.all()) or it == self.max_iter:
                break
            keep = ~done
            live, zt, vv, o, ot, r, rt = (a[keep] for a in (live, zt, vv, o, ot, r, rt))
            new_mask, new_t = new_mask[keep], new_t[keep]
            iters[live] += 1
            # update each target's matrix by the rows whose membership in A changed, or
            # rebuild it from A when that touches fewer rows (e.g. right after the start)
            Hl, old_mask = H[live], mask[live]
            change = new_mask ^ old_mask
            # per target: update by the rows whose membership changed, or rebuild from A when
            # that touches fewer rows (typically right after the all-active start)
            rebuild = change.sum(1) > new_mask.sum(1)
            if bool(rebuild.any()):
                Hl[rebuild] = shared["eye"] + 2 * c_pos * tmask[live][rebuild].to(dt)[:, None, None] \
                    * zt[rebuild][:, :, None] * zt[rebuild][:, None, :]
            rows = torch.where(rebuild[:, None], new_mask, change)
            sign = torch.where(new_mask, 1.0, -1.0).to(dt)
            if not self._padded():
                # exact-size rank-k updates, one per target: active counts vary several-fold
                # across targets, so padding them to the largest would waste most of the work
                for j in range(len(live)):
                    ia = rows[j].nonzero()[:, 0]
                    if len(ia):
                        Zj = Z.index_select(0, ia)
                        Hl[j].addmm_((Zj * sign[j, ia, None]).T, Zj, alpha=2 * c_neg)
            else:
                idx, valid = _padded_indices(rows)
                Zg = Z[idx]                               # (L, K, D) gathered rows
                sg = sign.gather(1, idx) * valid
                Hl = Hl + 2 * c_neg * (Zg * sg[:, :, None]).transpose(1, 2) @ Zg
            tchange = (new_t.to(dt) - tmask[live].to(dt))
            Hl = Hl + 2 * c_pos * tchange[:, None, None] * zt[:, :, None] * zt[:, None, :]
            L, info = torch.linalg.cholesky_ex(Hl)
            if bool((info > 0).any()):  # rounding drift from many updates: rebuild those exactly
                bad = info > 0
                idx2, valid2 = _padded_indices(new_mask[bad])
                Zb = Z[idx2] * valid2[:, :, None].to(dt)
                Hl[bad] = shared["eye"] + 2 * c_neg * Zb.transpose(1, 2) @ Zb + 2 * c_pos * \
                    new_t[bad].to(dt)[:, None, None] * zt[bad][:, :, None] * zt[bad][:, None, :]
                L, info = torch.linalg.cholesky_ex(Hl)
            # Newton step as a correction, -H^-1 grad (grad uses exactly A = new_mask): the
            # float32 solve's relative error then shrinks with the step, and the accuracy
            # reached is that of the gradient, not of the (d+1)^2 system
            delta = -torch.cholesky_solve(grad[keep][:, :, None], L)[:, :, 0]
            dz = delta @ Z.T                               # change of the negatives' values
            dzt = (delta * zt).sum(1)
            # residuals move as r(s) = r + s*rho: negatives rho = +dz, target rho = -dzt
            R = torch.cat([r, rt[:, None]], 1)
            RHO = torch.cat([dz, -dzt[:, None]], 1)
            c = torch.full((1, n + 1), c_neg, dtype=dt, device=dev)
            c[0, n] = c_pos
            s, _ = _line_search(R, RHO, c, (vv * delta).sum(1), (delta * delta).sum(1))
            v[live] = vv + s[:, None] * delta
            full_step[live] = s == 1
            still[live] = _fixpoint(s, torch.cat([dz, dzt[:, None]], 1), torch.cat([o, ot[:, None]], 1))
            H[live], mask[live], tmask[live] = Hl, new_mask, new_t
            first = False
        return v @ Z.T, iters, rel, ok

    # ------------------------------------------------------------------ kernel form

    @staticmethod
    def _kernel_shared(Z, c_neg):
        n = Z.shape[0]
        K = Z @ Z.T       # Gram matrix of the augmented negatives, shared by all targets
        # the all-active start needs (Kfull + D)^-1 y for each target; Kfull is K bordered by
        # the target's row, so one Cholesky of K + D_neg serves every target (block elimination)
        M = K + torch.eye(n, dtype=Z.dtype, device=Z.device) / (2 * c_neg)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) > 0:
            raise FloatingPointError("BatchedESVM kernel form: K + I/(2C) is not positive definite in "
                                     "this precision; use dtype=torch.float64 or form='primal'")
        Kpad = torch.zeros(n + 1, n + 1, dtype=Z.dtype, device=Z.device)
        Kpad[:n, :n] = K
        return {"K": K, "L": L, "Kpad": Kpad}

    def _solve_kernel(self, Z, Zt, shared, c_pos, c_neg):
        T = Zt.shape[0]
        n = Z.shape[0]
        dev, dt = Z.device, Z.dtype
        K, LK, Kpad = shared["K"], shared["L"], shared["Kpad"]
        kt = Zt @ Z.T                                      # (T, N) target-negative products
        ktt = (Zt * Zt).sum(1)
        y = torch.cat([-torch.ones(n, dtype=dt, device=dev), torch.ones(1, dtype=dt, device=dev)])
        c = torch.full((n + 1,), c_neg, dtype=dt, device=dev)
        c[n] = c_pos
        dinv = 1 / (2 * c)                                 # the dual's diagonal term 1/(2 c_j)

        def kmul(beta, kt_l, ktt_l):                       # (L, N+1) -> Kfull @ beta, per target
            bn, bt = beta[:, :n], beta[:, n]
            on = bn @ K + kt_l * bt[:, None]
            ot = (kt_l * bn).sum(1) + ktt_l * bt
            return torch.cat([on, ot[:, None]], 1)

        def grad_norm(gamma, zt):                          # ||Z^T gamma||, formed explicitly:
            return (gamma[:, :n] @ Z + gamma[:, n:] * zt).norm(dim=1)  # gamma^T K gamma loses digits

        g0 = grad_norm((-2 * c * y).expand(T, n + 1), Zt)  # ||grad f(0)||

        # start: least squares with every point active, by block elimination over the shared
        # Cholesky factor: [[K + D, k], [k^T, ktt + D_t]] [b; bt] = [y_N; 1]
        p = torch.cholesky_solve(y[:n, None], LK)[:, 0]            # (K + D)^-1 y_N
        U = torch.cholesky_solve(kt.T.contiguous(), LK).T          # (T, N): (K + D)^-1 k_t
        schur = ktt + dinv[n] - (kt * U).sum(1)
        bt = (1 - kt @ p) / schur
        beta = torch.cat([p[None, :] - U * bt[:, None], bt[:, None]], 1)
        o = kmul(beta, kt, ktt)                            # decision values (last: the target's)
        mask = torch.ones(T, n + 1, dtype=torch.bool, device=dev)
        live = torch.arange(T, device=dev)
        iters = torch.ones(T, dtype=torch.long, device=dev)
        rel = torch.full((T,), math.inf, dtype=dt, device=dev)
        ok = torch.zeros(T, dtype=torch.bool, device=dev)
        full_step = torch.ones(T, dtype=torch.bool, device=dev)
        still = torch.zeros(T, dtype=torch.bool, device=dev)
        for it in range(self.max_iter):
            kt_l, ktt_l = kt[live], ktt[live]
            bl, ol = beta[live], o[live]
            r = 1 - y * ol
            new_mask = r > 0
            # grad f(v) = Z^T gamma with gamma = beta - 2 c y max(0, r): zero exactly at the
            # optimum; checked over all N+1 points
            gamma = bl - 2 * c * y * r.clamp_min(0)
            rel[live] = grad_norm(gamma, Zt[live]) / g0[live]
            stable = (new_mask == mask[live]).all(1) & full_step[live]
            done = (rel[live] <= self.tol) | stable | still[live]
            ok[live[done]] = True
            if bool(done.all()) or it == self.max_iter - 1:
                break
            keep = ~done
            live, bl, ol, r, new_mask, gamma = (a[keep] for a in (live, bl, ol, r, new_mask, gamma))
            kt_l, ktt_l = kt[live], ktt[live]
            iters[live] += 1
            # Newton step restricted to the span of the active points, as a correction:
            # beta leaves the inactive points (d = -beta there) and on A solves
            # (K_AA + D_A) d_A = y_A - D_A beta_A - (Kfull beta')_A, beta' = beta zeroed off A,
            # i.e. the gradient of the restricted problem; padding rows are identity, rhs 0
            off = torch.where(new_mask, torch.zeros_like(bl), -bl)
            res = y - dinv * bl - kmul(bl + off, kt_l, ktt_l)
            if not self._padded():
                # scipy's OpenBLAS has its own thread pool: hold it to torch's thread count
                # (left alone it oversubscribes a busy machine and runs ~20x slower)
                from threadpoolctl import threadpool_limits
                with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
                    dbeta = _kernel_newton_cpu(K, kt_l, ktt_l, new_mask, res, off, dinv)
            else:
                dbeta = _kernel_newton_batched(K, kt_l, ktt_l, new_mask, res, off, dinv)
            dlt = kmul(dbeta, kt_l, ktt_l)                  # change of all decision values
            # residual r = 1 - y o moves with rho = -y * d(o); v.Delta = beta.d(o), |Delta|^2 = dbeta.d(o)
            s, _ = _line_search(r, -y * dlt, c, (bl * dlt).sum(1), (dbeta * dlt).sum(1))
            beta[live] = bl + s[:, None] * dbeta
            o[live] = ol + s[:, None] * dlt
            full_step[live] = s == 1
            still[live] = _fixpoint(s, dlt, ol)
            mask[live] = new_mask
        # recompute the decision values from beta (no accumulated drift from the updates)
        return kmul(beta, kt, ktt)[:, :n], iters, rel, ok
