"""What a person sends to the demo, checked before any model sees it: images and texts.

An uploaded image is opened lazily (header only), refused when its width x height is over the
pixel limit — before a single pixel is decoded, so a small file that would decompress into gigabytes
(a decompression bomb) costs nothing — then decoded (JPEGs at a reduced scale when they are far larger
than needed), turned upright and into 8-bit RGB (`mmqa.data.images.to_rgb`: EXIF rotation, grayscale,
alpha, CMYK, 16-bit) and scaled down so its longest side is at most `max_side`. Anything that fails
becomes a `gr.Error` with a sentence a person can act on, never a stack trace.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image, UnidentifiedImageError

from mmqa.data.images import to_rgb
from mmqa.errors import DataError, MMQAError

MAX_PIXELS = 64_000_000  # width x height above which an upload is refused unread (a 64 MP photo still passes)
MAX_SIDE = 1024  # longest side an accepted image is scaled down to: the model sees 64 px, the heatmap this size
MAX_TEXT_CHARS = 200  # longer questions and search texts are refused: the text encoder truncates them anyway
PIL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS  # Pillow itself refuses to open anything larger


def open_upload(path: str, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> Image.Image:
    """An uploaded file -> an upright RGB image whose longest side is at most `max_side`.
    Raises DataError (the message is for the person who sent the file) when it is not an image this
    demo reads, is damaged, or has more than `max_pixels` pixels."""
    try:
        with Image.open(path) as f:  # reads the header only
            w, h = f.size
            if w * h > max_pixels:
                raise DataError(f"The image is {w}×{h} = {w * h:,} pixels, over the limit of {max_pixels:,}: "
                                "send a smaller version of it.")
            if f.format == "JPEG":
                f.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale, still >= max_side
            f.load()
            img = to_rgb(f)
    except DataError:
        raise
    except Image.DecompressionBombError as e:  # beyond Pillow's own limit: the header alone says so
        raise DataError(f"The image is over the limit of {max_pixels:,} pixels ({e}).") from e
    except UnidentifiedImageError as e:
        raise DataError("The file is not an image this demo can read: send a PNG, JPEG, WebP, BMP, GIF or "
                        "TIFF picture.") from e
    except Exception as e:  # noqa: BLE001 - damaged data: PIL's plugins raise OSError, SyntaxError, struct.error, ...
        raise DataError(f"The image could not be decoded (the file may be damaged): {type(e).__name__}: {e}.") from e
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BICUBIC)  # keeps the aspect ratio
    return img


def image_input(*, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE, **kwargs) -> gr.Image:
    """A `gr.Image` whose upload is checked and converted by `open_upload` before a handler sees it:
    the handler gets an RGB PIL image (or None), the person a clear message. `kwargs` go to `gr.Image`.

    The check replaces this one component's `preprocess`: a subclass of `gr.Image` would do the same,
    but gradio writes a `.pyi` stub beside the source file of every Component subclass on import."""
    if not 0 < max_pixels <= PIL_LIMIT:
        raise MMQAError(f"max_pixels must be between 1 and {PIL_LIMIT:,} (Pillow refuses larger images), "
                        f"not {max_pixels:,}")
    image = gr.Image(type="pil", image_mode=None, **kwargs)

    def preprocess(payload) -> Image.Image | None:  # payload: gradio's ImageData of the upload
        if payload is None:
            return None
        if payload.path is None:  # a data: URL (webcam streaming), which this demo does not offer
            raise gr.Error("Send the image as a file upload.", print_exception=False)
        try:
            return open_upload(payload.path, max_pixels, max_side)
        except DataError as e:
            raise gr.Error(str(e), title="Image refused", print_exception=False) from None

    image.preprocess = preprocess
    return image


def check_image(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise gr.Error("No image: upload one (or pick an example) first.", print_exception=False)
    return image


def check_text(text: str | None, what: str, hint: str) -> str:
    """`text` stripped; a clear error when it is empty ("The {what} is empty: {hint}.") or too long."""
    text = (text or "").strip()
    if not text:
        raise gr.Error(f"The {what} is empty: {hint}.", print_exception=False)
    if len(text) > MAX_TEXT_CHARS:
        raise gr.Error(f"The {what} is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}.",
                       print_exception=False)
    return text
