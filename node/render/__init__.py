"""Server-side rendering of volumes: the pixels behind the ``renders`` handler and the 3D viewer.

- ``orientation``: the display convention (radiological) and patient-direction labels;
- ``aligned``: a volume on a patient-aligned grid, from its Geometry (never from array order);
- ``projections``: MIP / MinIP / average slabs and MPR stacks (NumPy, no VTK);
- ``cpr``: curved planar reformation along a patient-coordinate centreline;
- ``vr``: ``VolumeScene``, offscreen VTK volume rendering (EGL, OSMesa fallback) with presets;
- ``windows``, ``annotate``, ``font``: grey-scale windows and burned-in labels and scale bars.

``vr`` and ``offscreen`` import VTK; the other modules do not.
"""
