"""Training-free image descriptors: thumbnails, a global descriptor, and aligned copy matching.

Why not a network: no pretrained weights can be downloaded, and a randomly initialised ViT is a
poor copy detector. Copy detection needs *alignment*, not semantics: a crop, a resize, a
brightness change or JPEG re-encoding keeps the pixels of the original, just moved and rescaled.
So every image is reduced once to a 32x32 RGB thumbnail (3 KB, also used for report grids), and

- candidates come from FAISS over 12x12 grey views: each image is queried with its full view and
  crops of it at 5 scales x 4x4 positions, so a cropped copy is near one of the crops;
- candidates are verified by multi-scale normalised cross-correlation (template matching): the
  smaller-content image is resized and slid over the other one, coarse sizes first, then +-1 px in
  each axis (aspect changes); the sharper image of a pair is first blurred to the other's source
  resolution. Two scores at the best alignment decide: the copy score (NCC of the RGB pixels with
  one mean and scale for all channels, black background left out -- so the fundus frame or the
  sector outline shared by a modality does not count, and a colour cast does) and the worst
  patch NCC of a 3x3 grid (a copy agrees everywhere, a second photograph of the same eye does not).

`global_descriptor` (layout, gradient-orientation, colour and intensity statistics) is the
`embed.backbone: descriptor` embedding for retrieval and clustering: it separates modalities
(X-ray vs fundus vs ultrasound) well, though it knows nothing finer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THUMB = 32
VIEW_SIZE = 12
VIEW_SCALES = (0.95, 0.9, 0.85, 0.8, 0.75)
VIEW_OFFSETS = 4
LUMA = torch.tensor([0.299, 0.587, 0.114])


def thumbnail(img: torch.Tensor) -> np.ndarray:
    """float C x H x W in [0, 1] -> uint8 32 x 32 x 3 (grey repeated), antialiased, aspect squashed."""
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"expected a 1- or 3-channel C x H x W image, got shape {tuple(img.shape)}"
        )
    x = img.float()[None]
    if x.shape[-2:] != (THUMB, THUMB):
        x = F.interpolate(
            x, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False
        )
    x = x[0].clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()


def to_float(thumbs: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) -> float (N, 3, 32, 32) in [0, 1]."""
    return torch.from_numpy(np.array(thumbs, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0


def gray(x: torch.Tensor) -> torch.Tensor:
    return (x * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Flatten per row, remove the mean, scale to unit norm (NCC as a dot product)."""
    x = x.reshape(x.shape[0], -1)
    x = x - x.mean(1, keepdim=True)
    return x / (x.norm(dim=1, keepdim=True) + 1e-6)


def view_boxes() -> torch.Tensor:
    """(V, 3) boxes (centre x, centre y, side) in [0, 1] units: the full image, then crops."""
    boxes = [(0.5, 0.5, 1.0)]
    for f in VIEW_SCALES:
        for oy in np.linspace(0, 1 - f, VIEW_OFFSETS):
            for ox in np.linspace(0, 1 - f, VIEW_OFFSETS):
                boxes.append((ox + f / 2, oy + f / 2, f))
    return torch.tensor(boxes, dtype=torch.float32)


def _sample(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = boxes[:, 2]
    theta[:, 1, 1] = boxes[:, 2]
    theta[:, 0, 2] = 2 * boxes[:, 0] - 1
    theta[:, 1, 2] = 2 * boxes[:, 1] - 1
    grid = F.affine_grid(theta, (len(boxes), x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def full_views(thumbs: np.ndarray) -> np.ndarray:
    """(N, 144) float32 unit vectors of the whole grey image at 12x12: what the index holds."""
    g = gray(to_float(thumbs))
    g = F.interpolate(
        g, size=(VIEW_SIZE, VIEW_SIZE), mode="bilinear", antialias=True, align_corners=False
    )
    return _unit(g).numpy()


def crop_views(thumbs: np.ndarray) -> np.ndarray:
    """(N, V, 144) float32 unit vectors of the full image and its crops: the queries."""
    boxes = view_boxes()
    g = gray(to_float(thumbs))
    g = F.avg_pool2d(g, 2)  # 16x16: antialias before sampling 12x12 crops
    n, v = len(g), len(boxes)
    out = _sample(g.repeat_interleave(v, 0), boxes.repeat(n, 1), VIEW_SIZE)
    return _unit(out).view(n, v, -1).numpy()


def global_descriptor(thumbs: np.ndarray) -> np.ndarray:
    """(N, 214) float32 unit vectors: grey layout 8x8, 4x4x8 gradient orientations, colour, histogram."""
    x = to_float(thumbs)
    g = gray(x)
    layout = _unit(F.adaptive_avg_pool2d(g, 8))
    gx = F.conv2d(
        F.pad(g, (1, 1, 1, 1), mode="replicate"),
        torch.tensor([[[[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]]]) / 8,
    )
    gy = F.conv2d(
        F.pad(g, (1, 1, 1, 1), mode="replicate"),
        torch.tensor([[[[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]]]]) / 8,
    )
    mag = (gx**2 + gy**2).sqrt()
    ang = torch.atan2(gy, gx)  # signed orientation, 8 bins
    bins = ((ang + np.pi) / (2 * np.pi) * 8).long().clamp(0, 7)
    hog = torch.zeros(len(x), 8, THUMB, THUMB).scatter_(1, bins, mag)
    hog = F.adaptive_avg_pool2d(hog, 4).flatten(1)
    hog = hog / (hog.norm(dim=1, keepdim=True) + 1e-6)
    hog = hog.clamp(max=0.2)
    hog = hog / (hog.norm(dim=1, keepdim=True) + 1e-6)
    colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    colour = colour - colour.mean(1, keepdim=True) * torch.tensor([1.0, 1, 1, 0, 0, 0])
    hist = torch.stack([torch.histc(v, bins=16, min=0, max=1) for v in g.flatten(1)]).sqrt()
    blocks = [(layout, 1.0), (hog, 1.0), (colour, 1.0), (hist, 0.7)]
    out = torch.cat([w * b / (b.norm(dim=1, keepdim=True) + 1e-6) for b, w in blocks], 1)
    return (out / out.norm(dim=1, keepdim=True)).numpy().astype(np.float32)


COARSE_SIZES = (32, 30, 28, 26, 24, 22)
PATCH_GRID = 3
PATCH_FLAT = 0.02  # patch std (intensity units) below which a patch has no texture to compare
COLOUR_POOL = 2  # JPEG keeps colour at half resolution; measured: fewer false links, same recall
DARK = 0.08  # grey level below which a pixel counts as background (black frame) in the copy score
RESOLUTION_RATIO = 1.25  # a pair member this much sharper than the other is blurred down to it


def _integral(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integral images of x and x^2, (m, S+1, S+1): window sums in O(1) per position."""
    return (
        F.pad(x[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0)),
        F.pad((x[:, 0] ** 2).cumsum(1).cumsum(2), (1, 0, 1, 0)),
    )


def _window(ii: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    return ii[:, sy:, sx:] - ii[:, :-sy, sx:] - ii[:, sy:, :-sx] + ii[:, :-sy, :-sx]


def _ncc_map(
    big: torch.Tensor, ii: tuple[torch.Tensor, torch.Tensor], small: torch.Tensor, sy: int, sx: int
) -> torch.Tensor:
    """NCC of `small` resized to sy x sx at every position inside `big` (both (m, 1, S, S))."""
    m, size = len(big), big.shape[-1]
    tpl = small
    if (sy, sx) != (size, size):
        tpl = F.interpolate(
            small, size=(sy, sx), mode="bilinear", antialias=True, align_corners=False
        )
    tpl = tpl - tpl.mean((2, 3), keepdim=True)
    tpl = tpl / (tpl.flatten(1).norm(dim=1).view(m, 1, 1, 1) + 1e-6)
    num = F.conv2d(big.reshape(1, m, size, size), tpl, groups=m)[0]
    s1, s2 = _window(ii[0], sy, sx), _window(ii[1], sy, sx)
    den = (s2 - s1 * s1 / (sy * sx)).clamp(min=0).sqrt()
    return num / (den + 1e-3)


def coarse_ncc(big: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Best NCC over square sizes at half resolution (16 px): a 12x cheaper upper-ish bound used to
    skip pairs that cannot be copies (measured: copies lose at most ~0.05 against full resolution)."""
    b, s = F.avg_pool2d(big, 2), F.avg_pool2d(small, 2)
    ii = _integral(b)
    best = torch.full((len(b),), -2.0)
    for size in COARSE_SIZES:
        best = torch.maximum(best, _ncc_map(b, ii, s, size // 2, size // 2).flatten(1).amax(1))
    return best


def _search(
    big: torch.Tensor, small: torch.Tensor, sizes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best NCC and box (y, x, sy, sx) over the given template sizes, per pair."""
    m = len(big)
    best = torch.full((m,), -2.0)
    box = torch.zeros(m, 4, dtype=torch.long)
    ii = _integral(big)
    for sy, sx in sizes:
        ncc = _ncc_map(big, ii, small, sy, sx)
        val, arg = ncc.flatten(1).max(1)
        width = ncc.shape[-1]
        better = val > best
        best = torch.where(better, val, best)
        new = torch.stack(
            [arg // width, arg % width, torch.full_like(arg, sy), torch.full_like(arg, sx)], 1
        )
        box = torch.where(better.view(-1, 1), new, box)
    return best, box


def best_alignment(
    ga: torch.Tensor, gb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align grey thumbnails both ways: (best NCC, box in the container, True where b is inside a).

    Square sizes in steps of 2 px in both directions first; then, in the better direction only,
    every +-1 px change of height and width around the best size (sub-step scales, aspect changes).
    """
    square = [(size, size) for size in COARSE_SIZES]
    v1, box1 = _search(ga, gb, square)  # b's content inside a
    v2, box2 = _search(gb, ga, square)  # a's content inside b
    b_in_a = v1 >= v2
    best = torch.maximum(v1, v2)
    box = torch.where(b_in_a.view(-1, 1), box1, box2)
    big = torch.where(b_in_a.view(-1, 1, 1, 1), ga, gb)
    small = torch.where(b_in_a.view(-1, 1, 1, 1), gb, ga)
    coarse = box[:, 2].clone()
    for size in sorted(set(coarse.tolist())):
        rows = torch.nonzero(coarse == size)[:, 0]
        near = [
            (size + dy, size + dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if (dy or dx) and size + max(dy, dx) <= THUMB
        ]
        val, bx = _search(big[rows], small[rows], near)
        better = val > best[rows]
        best[rows[better]] = val[better]
        box[rows[better]] = bx[better]
    return best, box, b_in_a


def patch_agreement(
    a: torch.Tensor, b: torch.Tensor, grid: int = PATCH_GRID, flat: float = PATCH_FLAT
) -> torch.Tensor:
    """Worst NCC over a grid x grid of patches of two aligned grey images (m, 1, 24, 24).

    A copy agrees everywhere; two shots of the same eye share the disk outline but not the optic
    disc position, so one patch disagrees. Patches flat in both images agree; a patch textured in
    one image and flat in the other is a disagreement (-1).
    """
    m, k = len(a), a.shape[-1] // grid

    def patches(x: torch.Tensor) -> torch.Tensor:  # (m, grid*grid, k*k)
        return x.reshape(m, grid, k, grid, k).permute(0, 1, 3, 2, 4).reshape(m, grid * grid, k * k)

    pa, pb = patches(a), patches(b)
    pa = pa - pa.mean(-1, keepdim=True)
    pb = pb - pb.mean(-1, keepdim=True)
    sa, sb = pa.pow(2).mean(-1).sqrt(), pb.pow(2).mean(-1).sqrt()
    ncc = (pa * pb).mean(-1) / (sa * sb + 1e-6)
    textured = (sa > flat) | (sb > flat)
    ncc = torch.where(textured, ncc, torch.ones_like(ncc))
    ncc = torch.where(
        textured & ((sa <= flat / 2) | (sb <= flat / 2)), torch.full_like(ncc, -1.0), ncc
    )
    return ncc.amin(1)


def joint_colour_ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NCC of aligned RGB images (m, 3, h, w), one mean and one scale for all channels, over the
    pixels that are not black in either image.

    A brightness or contrast change moves all channels alike and keeps it; a different colour cast
    (two photographs of the same eye on different days) lowers it. Black borders (the frame around
    a fundus, the corners of a sector scan) are left out: shared by every image of a modality, they
    would make any two of them look alike."""
    if COLOUR_POOL > 1:  # JPEG subsamples colour 2x2: compare colour at that resolution
        a, b = F.avg_pool2d(a, COLOUR_POOL), F.avg_pool2d(b, COLOUR_POOL)
    mask = ((gray(a) > DARK) & (gray(b) > DARK)).float()
    m = mask.expand(-1, 3, -1, -1).flatten(1)
    n = m.sum(1, keepdim=True).clamp(min=1)
    x, y = a.flatten(1), b.flatten(1)
    x = (x - (x * m).sum(1, keepdim=True) / n) * m
    y = (y - (y * m).sum(1, keepdim=True) / n) * m
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + 1e-6)


def aligned_pair(
    big: torch.Tensor, small: torch.Tensor, box: torch.Tensor, size: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """big's window `box` and small's whole image, both resampled to size x size (RGB)."""
    m = len(big)
    out_a, out_b = torch.zeros(m, 3, size, size), torch.zeros(m, 3, size, size)
    codes = box[:, 2] * 100 + box[:, 3]
    for code in torch.unique(codes).tolist():
        rows = torch.nonzero(codes == code)[:, 0]
        sy, sx = code // 100, code % 100
        ys = box[rows, 0].view(-1, 1) + torch.arange(sy).view(1, -1)
        xs = box[rows, 1].view(-1, 1) + torch.arange(sx).view(1, -1)
        win = big[rows][
            torch.arange(len(rows)).view(-1, 1, 1), :, ys.view(-1, sy, 1), xs.view(-1, 1, sx)
        ]
        win = win.permute(0, 3, 1, 2)
        sm = F.interpolate(
            small[rows], size=(sy, sx), mode="bilinear", antialias=True, align_corners=False
        )
        out_a[rows] = F.interpolate(win, size=(size, size), mode="bilinear", align_corners=False)
        out_b[rows] = F.interpolate(sm, size=(size, size), mode="bilinear", align_corners=False)
    return out_a, out_b


def common_resolution(
    ta: torch.Tensor, tb: torch.Tensor, res_a: torch.Tensor, res_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur the sharper thumbnail of a pair down to the other's source resolution (pixels on the
    short side) and back to 32, so a 14 px copy of a 28 px image compares like for like. Images of
    similar resolution are left alone: blurring both would make every pair of look-alikes closer."""
    out_a, out_b = ta.clone(), tb.clone()
    for src, dst, res, other in ((ta, out_a, res_a, res_b), (tb, out_b, res_b, res_a)):
        target = torch.minimum(other, torch.full_like(other, THUMB))
        sharper = res > target * RESOLUTION_RATIO
        for r in torch.unique(target[sharper]).tolist():
            rows = torch.nonzero(sharper & (target == r))[:, 0]
            low = F.interpolate(
                src[rows], size=(r, r), mode="bilinear", antialias=True, align_corners=False
            )
            dst[rows] = F.interpolate(
                low, size=(THUMB, THUMB), mode="bilinear", align_corners=False
            )
    return out_a, out_b


def match_pairs(
    thumbs_a: np.ndarray,
    thumbs_b: np.ndarray,
    batch_size: int = 2048,
    prefilter: float = -1.0,
    res_a: np.ndarray | None = None,
    res_b: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Align every pair (thumbs_a[i], thumbs_b[i]) both ways and score the best alignment.

    Returns float32 arrays: `ncc` (the copy score: `joint_colour_ncc` of the pair aligned by grey
    template matching), `local` (worst-patch NCC of
    the aligned images, `patch_agreement`), `scale` (side of the contained image's content
    relative to the container: 1 for resizes, < 1 for crops). Pairs whose half-resolution NCC is
    below `prefilter` are not aligned at full resolution: they get that NCC, local -1, scale 0.
    `res_a`/`res_b`: short side of the source images; pairs are compared at the lower one.
    """
    n = len(thumbs_a)
    out = {k: np.zeros(n, np.float32) for k in ("ncc", "local", "scale")}
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        ta, tb = to_float(thumbs_a[s:e]), to_float(thumbs_b[s:e])
        if res_a is not None and res_b is not None:
            ra = torch.from_numpy(np.asarray(res_a[s:e], dtype=np.int64)).clamp(min=4)
            rb = torch.from_numpy(np.asarray(res_b[s:e], dtype=np.int64)).clamp(min=4)
            ta, tb = common_resolution(ta, tb, ra, rb)
        ga, gb = gray(ta), gray(tb)
        if prefilter > -1:
            coarse = torch.maximum(coarse_ncc(ga, gb), coarse_ncc(gb, ga))
            out["ncc"][s:e], out["local"][s:e] = coarse.numpy(), -1.0
            rows = torch.nonzero(coarse >= prefilter)[:, 0]
            if not len(rows):
                continue
            ta, tb, ga, gb = ta[rows], tb[rows], ga[rows], gb[rows]
            s_idx = s + rows.numpy()
        else:
            s_idx = np.arange(s, e)
        best, box, b_in_a = best_alignment(ga, gb)
        first = b_in_a.view(-1, 1, 1, 1)
        a, b = aligned_pair(torch.where(first, ta, tb), torch.where(first, tb, ta), box)
        out["ncc"][s_idx] = joint_colour_ncc(a, b).numpy()
        out["local"][s_idx] = patch_agreement(gray(a), gray(b)).numpy()
        out["scale"][s_idx] = ((box[:, 2] * box[:, 3]).float().sqrt() / THUMB).numpy()
    return out
