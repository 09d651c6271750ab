"""Reports as pictures: the self-contained HTML page (html.py) and a headless-Chromium driver (browser.py)
that renders it, checks every chart drew and takes screenshots."""

from gpuledger.report.html import collect, render, write_report

__all__ = ["collect", "render", "write_report"]
