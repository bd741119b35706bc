"""Offscreen OpenGL for VTK: EGL first, OSMesa as the fallback, no X display ever.

EGL is the one code path for both machine kinds: on a GPU host it reaches the vendor driver,
on a CPU-only host Mesa's llvmpipe (Debian packages libegl1, libegl-mesa0, libgl1-mesa-dri).
OSMesa (libosmesa6) is only tried when EGL cannot create a context. VTK's OSMesa window
reports support even when libOSMesa is absent and then crashes on the first render, so the
library is looked up before that window is made.
"""
from __future__ import annotations

import ctypes.util
import re

import vtkmodules.vtkRenderingOpenGL2 as gl
import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: F401  (registers the OpenGL volume mappers)

__all__ = ["RenderingUnavailable", "offscreen_window", "gl_renderer", "is_software_renderer"]

_SOFTWARE = re.compile(r"llvmpipe|softpipe|swrast|lavapipe|software", re.IGNORECASE)


class RenderingUnavailable(RuntimeError):
    """No offscreen OpenGL context could be created on this host."""


def offscreen_window(width: int, height: int):
    """A vtkRenderWindow rendering offscreen through EGL or, failing that, OSMesa."""
    tried = []
    candidates = [("EGL", gl.vtkEGLRenderWindow)]
    if ctypes.util.find_library("OSMesa"):
        candidates.append(("OSMesa", gl.vtkOSOpenGLRenderWindow))
    else:
        tried.append("OSMesa: libOSMesa not installed (Debian package libosmesa6)")
    for name, cls in candidates:
        rw = cls()
        rw.SetOffScreenRendering(1)
        rw.SetSize(int(width), int(height))
        if rw.SupportsOpenGL():
            return rw
        rw.Finalize()
        tried.append(f"{name}: no OpenGL context")
    raise RenderingUnavailable(
        "no offscreen OpenGL for VTK (" + "; ".join(tried) + "). Install Debian packages "
        "libegl1 libegl-mesa0 libgl1-mesa-dri (EGL with Mesa llvmpipe, or a GPU driver's EGL), "
        "or libosmesa6 for the OSMesa fallback."
    )


def gl_renderer(render_window) -> str:
    """The OpenGL renderer string ("llvmpipe (LLVM 15.0.6, 256 bits)", "NVIDIA H100 ..."), after a render."""
    m = re.search(r"OpenGL renderer string:\s*(.+)", render_window.ReportCapabilities() or "")
    return m.group(1).strip() if m else "unknown"


def is_software_renderer(renderer: str) -> bool:
    return bool(_SOFTWARE.search(renderer))
