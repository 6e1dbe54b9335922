"""Images → features: stream an ADM .npz or a folder of images through a feature network.

A feature network is any nn.Module mapping uint8 images (N, 3, H, W) to a dict of (N, ·) tensors with at
least "pool" (FID features) and optionally "spatial" (sFID) and "logits" (IS); FIDInceptionV3 is the real
one, tests plug in a tiny random one. Image batches everywhere here are the ADM layout: (N, H, W, 3) uint8.
"""

import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ditscale.data.crop import center_crop_arr

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


#################################################################################
#                              ADM .npz streaming                               #
#################################################################################


def _open_npy(zf, path, key):
    """Open member `key` of an open .npz and read its header → (file object, shape, dtype)."""
    name = f"{key}.npy"
    if name not in zf.namelist():
        keys = sorted(n.removesuffix(".npy") for n in zf.namelist())
        raise ValueError(f"{path}: no array {key!r} (arrays: {keys})")
    f = zf.open(name)
    version = np.lib.format.read_magic(f)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(
        version
    )
    if read_header is None:
        raise ValueError(f"{path}: {key} uses .npy format {version}, unsupported")
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {key} must be a C-ordered numeric array")
    return f, shape, dtype


def npz_array_info(path, key="arr_0"):
    """(shape, dtype) of one array of an .npz, read from its header only."""
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape, dtype = _open_npy(zf, path, key)
            f.close()
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not an .npz file ({e})") from e
    return shape, dtype


def check_image_array(shape, dtype, source):
    """ADM sample layout: (N, H, W, 3) uint8 (numpy or torch dtype)."""
    dtype = str(dtype).removeprefix("torch.")
    if len(shape) != 4 or shape[-1] != 3 or dtype != "uint8":
        raise ValueError(f"{source}: expected images (N, H, W, 3) uint8, got {tuple(shape)} {dtype}")


def iter_npz_batches(path, key="arr_0", batch_size=200):
    """Yield (B, ...) slices of a large array of an .npz without loading it whole (works compressed too)."""
    with zipfile.ZipFile(path) as zf:
        f, shape, dtype = _open_npy(zf, path, key)
        with f:
            for start in range(0, shape[0], batch_size):
                batch = np.empty((min(batch_size, shape[0] - start), *shape[1:]), dtype)
                view, got = memoryview(batch).cast("B"), 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(f"{path}: {key} is truncated at row {start}")
                    got += n
                yield batch


#################################################################################
#                              Folder of images                                 #
#################################################################################


def list_images(root):
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    return files


class ImageFolder(torch.utils.data.Dataset):
    """Images of a folder (recursive, sorted), RGB, centre-cropped to `resolution` → (H, W, 3) uint8."""

    def __init__(self, root, resolution):
        self.files, self.resolution = list_images(root), resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return torch.from_numpy(center_crop_arr(im.convert("RGB"), self.resolution).copy())
        except OSError as e:
            raise ValueError(f"{self.files[i]}: cannot be read as an image ({e})") from e


def iter_folder_batches(root, resolution, batch_size=200, workers=4):
    dataset = ImageFolder(root, resolution)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    return len(dataset), iter(loader)


#################################################################################
#                                  Extraction                                   #
#################################################################################


def device_of(net):
    """Device of a network's parameters (CPU for a network without any)."""
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def extract_features(net, batches, total=None, desc="features", progress=True):
    """Run image batches ((B, H, W, 3) uint8 numpy arrays or tensors) through the feature network on its
    device. Returns {name: (N, D) float32 numpy}. Outputs stay on the device until the end so that the
    next batch is read while the network still runs."""
    device, outputs, n = device_of(net), {}, 0
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for batch in batches:
        x = torch.as_tensor(batch)
        check_image_array(x.shape, x.dtype, f"{desc} batch")
        out = net(x.to(device, non_blocking=True).permute(0, 3, 1, 2))  # (B, 3, H, W)
        if "pool" not in out:
            raise ValueError(f"feature network returned {sorted(out)}, needs at least 'pool'")
        for name, v in out.items():
            outputs.setdefault(name, []).append(v.float().flatten(1))
        n += len(x)
        bar.update(len(x))
    bar.close()
    if n == 0:
        raise ValueError(f"{desc}: no images")
    return {name: torch.cat(v).cpu().numpy() for name, v in outputs.items()}


def npz_features(net, path, batch_size=200, progress=True):
    """Features of the images `arr_0` of an ADM .npz."""
    shape, dtype = npz_array_info(path)
    check_image_array(shape, dtype, f"{path}: arr_0")
    return extract_features(
        net, iter_npz_batches(path, "arr_0", batch_size), total=shape[0], desc=Path(path).name, progress=progress
    )


def folder_features(net, root, resolution, batch_size=200, workers=4, progress=True):
    """Features of a folder of real images, preprocessed as ADM's reference batches (centre crop)."""
    total, batches = iter_folder_batches(root, resolution, batch_size, workers)
    return extract_features(net, batches, total=total, desc=Path(root).name, progress=progress)
