"""How good and how steady an enhancement is: the figures ``streamgpen eval`` reports.

:mod:`.images`: full-reference photo metrics (PSNR, SSIM, LPIPS), torchmetrics' implementations
(maintained, pure torch, already in torch's ecosystem; pyiqa pulls in many dependencies, piq has
been unmaintained since 2023). :mod:`.temporal`: a video's temporal figures that need no ground
truth (warping error along the input's optical flow, landmark jitter, mask change), pure
functions on numpy arrays. Nothing here reads files or knows the command line (``apps.evaluate``
does).
"""
