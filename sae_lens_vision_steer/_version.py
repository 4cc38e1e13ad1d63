"""The package version, from the installed distribution (nothing inside the package imports the root)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-lens-vision-steer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
