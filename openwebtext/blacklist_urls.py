"""Filter URL lists down to the unique pages worth downloading for a web-text corpus.

    python openwebtext/blacklist_urls.py URLS_DIR_OR_FILES... --output urls.txt [--overwrite]
        [--extra-domains d.com ...] [--extra-domains-file FILE] [--extra-extensions .ext ...]
        [--extra-extensions-file FILE] [--min-length 12]

Reads one URL per line (blank lines skipped) from the files given and from every file in the folders
given, in order, and writes the URLs kept, one per line, in the order first seen. Each URL is checked in
this order and dropped at the first rule it breaks:

1. **too short**: fewer than ``--min-length`` characters (default 12, the length of ``http://a.bc/``);
2. **malformed**: whitespace or control characters inside, a scheme other than http/https, no host, a
   host that is not a dotted domain name or an IP address, a port that is not a number;
3. **blacklisted domain**: the host (port and a leading ``www.`` ignored) is a listed domain or a
   subdomain of one. ``DEFAULT_DOMAINS`` lists social networks, image, video and audio hosts, file
   lockers, shops, link shorteners and the like, whose pages carry little prose (and Wikipedia, which
   corpora take whole);
4. **blacklisted extension**: the last segment of the path ends in a listed extension (case-insensitive;
   ``DEFAULT_EXTENSIONS``: images, video, audio, archives, executables, office documents and pdf, fonts);
5. **duplicate**: the normalised URL was kept before. Normalising lower-cases the scheme and host,
   drops the fragment, the default port (80 for http, 443 for https) and the trailing slashes of the
   path (an empty path becomes ``/``); the query is kept. The URL written is the normalised one.

``--extra-domains``/``--extra-extensions`` add to the lists; the ``-file`` forms read one entry per line
(``#`` starts a comment). The counts of each reason are printed at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import posixpath
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.errors import DataError  # noqa: E402
from openwebtext.common import atomic_output, byte_progress, check_output, expand_inputs, print_report, run_cli  # noqa: E402

MIN_LENGTH = 12

DEFAULT_DOMAINS = frozenset({
    # social networks and forums whose pages are feeds, logins or comment threads
    "facebook.com", "fb.com", "fbcdn.net", "twitter.com", "x.com", "twimg.com", "instagram.com", "tiktok.com",
    "snapchat.com", "linkedin.com", "pinterest.com", "pinimg.com", "tumblr.com", "reddit.com", "redd.it",
    "redditmedia.com", "reddituploads.com", "discord.com", "discordapp.com", "discord.gg", "vk.com",
    "weibo.com", "threads.net", "quora.com",
    # image hosts and galleries
    "imgur.com", "flickr.com", "staticflickr.com", "photobucket.com", "imageshack.com", "tinypic.com",
    "gyazo.com", "prnt.sc", "prntscr.com", "postimg.cc", "ibb.co", "imgbb.com", "imgflip.com", "giphy.com",
    "gfycat.com", "deviantart.com", "artstation.com", "500px.com", "puu.sh", "memegenerator.net",
    "quickmeme.com", "imagefap.com",
    # video, streaming and audio
    "youtube.com", "youtu.be", "ytimg.com", "vimeo.com", "dailymotion.com", "twitch.tv", "streamable.com",
    "liveleak.com", "vine.co", "soundcloud.com", "spotify.com", "bandcamp.com", "vocaroo.com", "soundgasm.net",
    # file lockers and cloud storage
    "dropbox.com", "dropboxusercontent.com", "mega.nz", "mediafire.com", "wetransfer.com", "rapidgator.net",
    "zippyshare.com", "4shared.com", "sendspace.com", "box.com", "onedrive.live.com", "drive.google.com",
    # shops, search and tools: listings and forms rather than prose
    "amazon.com", "ebay.com", "walmart.com", "aliexpress.com", "google.com", "bing.com", "lmgtfy.com",
    "strawpoll.me", "timeanddate.com", "pcpartpicker.com", "archive.org",
    # link shorteners: the page behind them is unknown
    "t.co", "bit.ly", "goo.gl", "tinyurl.com", "ow.ly",
    # adult sites
    "pornhub.com", "xvideos.com", "xhamster.com", "redtube.com", "spankbang.com", "e621.net",
    # taken whole by other corpora
    "wikipedia.org", "wikimedia.org",
})

DEFAULT_EXTENSIONS = frozenset({
    # images
    ".jpg", ".jpeg", ".png", ".gif", ".gifv", ".bmp", ".tif", ".tiff", ".webp", ".svg", ".ico", ".heic", ".psd",
    # video and audio
    ".mp4", ".webm", ".avi", ".mov", ".mkv", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg", ".3gp", ".swf",
    ".mp3", ".wav", ".ogg", ".flac", ".m4a", ".aac", ".wma",
    # archives and disk images
    ".zip", ".rar", ".7z", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".iso", ".dmg", ".torrent",
    # executables and packages
    ".exe", ".msi", ".apk", ".bin", ".deb", ".rpm", ".jar", ".dll", ".bat",
    # documents and data
    ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".epub", ".mobi", ".csv",
    # fonts
    ".ttf", ".otf", ".woff", ".woff2",
})

TOO_SHORT, MALFORMED, DOMAIN, EXTENSION, DUPLICATE = (
    "too short", "malformed", "blacklisted domain", "blacklisted extension", "duplicate")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _valid_host(host: str) -> bool:
    """A dotted domain name (unicode letters allowed) or an IP address."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) < 2 or len(host) > 253 or labels[-1].isdigit():
        return False
    return all(0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
               and all(c.isalnum() or c in "-_" for c in label) for label in labels)


def normalize_url(url: str) -> str | None:
    """The normalised form of ``url`` (see the module docstring), or None when it is malformed."""
    url = url.strip()
    if not url or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bracketed host that is not IPv6, a port that is no number
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS or not _valid_host(host):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    path = parts.path.rstrip("/") or "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def clean_entries(entries: Iterable[str], extension: bool = False) -> set[str]:
    """Domains (lower-case, no leading dot or ``www.``) or extensions (lower-case, leading dot) from a list."""
    cleaned = set()
    for entry in entries:
        entry = entry.strip().lower()
        if not entry:
            continue
        if extension:
            cleaned.add(entry if entry.startswith(".") else "." + entry)
        else:
            entry = entry.lstrip(".")
            cleaned.add(entry[4:] if entry.startswith("www.") else entry)
    return cleaned


@dataclass
class UrlFilter:
    """The rules of the module docstring; ``check`` applies them one URL at a time, remembering those kept."""

    domains: frozenset[str] = DEFAULT_DOMAINS
    extensions: frozenset[str] = DEFAULT_EXTENSIONS
    min_length: int = MIN_LENGTH
    seen: set[str] = field(default_factory=set)

    def blacklisted_domain(self, host: str) -> bool:
        """Whether ``host`` is a listed domain or lies under one."""
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))

    def check(self, url: str) -> tuple[str | None, str | None]:
        """``(normalised url, None)`` for a URL to keep, else ``(None, reason)``."""
        url = url.strip()
        if len(url) < self.min_length:
            return None, TOO_SHORT
        norm = normalize_url(url)
        if norm is None:
            return None, MALFORMED
        parts = urlsplit(norm)
        if self.blacklisted_domain(parts.hostname or ""):
            return None, DOMAIN
        if posixpath.splitext(unquote(parts.path))[1].lower() in self.extensions:
            return None, EXTENSION
        if norm in self.seen:
            return None, DUPLICATE
        self.seen.add(norm)
        return norm, None


def read_list_file(path: str, flag: str) -> list[str]:
    """Entries of a ``--extra-*-file``: one per line, ``#`` comments and blank lines ignored."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file; check the path")
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def read_urls(paths: Iterable[str], on_bytes=None) -> Iterator[str]:
    """Each non-blank line of each file in ``paths``, stripped; bytes that are not UTF-8 become U+FFFD."""
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if on_bytes is not None:
                    on_bytes(len(raw))
                line = raw.decode("utf-8", errors="replace").strip()
                if line:
                    yield line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="files of URLs (one per line) or folders of such files")
    parser.add_argument("--output", required=True, help="where to write the URLs kept, one per line")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace --output if it exists")
    parser.add_argument("--extra-domains", nargs="+", default=[], metavar="DOMAIN",
                        help="more domains to drop (their subdomains too)")
    parser.add_argument("--extra-domains-file", help="a file of more domains to drop, one per line")
    parser.add_argument("--extra-extensions", nargs="+", default=[], metavar="EXT",
                        help="more file extensions to drop (e.g. .svg or svg)")
    parser.add_argument("--extra-extensions-file", help="a file of more extensions to drop, one per line")
    parser.add_argument("--min-length", type=int, default=MIN_LENGTH,
                        help=f"drop URLs shorter than this many characters (default {MIN_LENGTH})")
    args = parser.parse_args(argv)

    files = expand_inputs(args.inputs, "input", exclude=[args.output])
    check_output(args.output, args.force, files, "--output")
    domains = list(args.extra_domains)
    extensions = list(args.extra_extensions)
    if args.extra_domains_file:
        domains += read_list_file(args.extra_domains_file, "--extra-domains-file")
    if args.extra_extensions_file:
        extensions += read_list_file(args.extra_extensions_file, "--extra-extensions-file")
    url_filter = UrlFilter(DEFAULT_DOMAINS | clean_entries(domains),
                           DEFAULT_EXTENSIONS | clean_entries(extensions, extension=True), args.min_length)

    read, dropped = 0, Counter()
    with atomic_output(args.output) as out, byte_progress(files, "filtering urls") as bar:
        for url in read_urls(files, bar.update):
            read += 1
            kept, reason = url_filter.check(url)
            if reason is not None:
                dropped[reason] += 1
            else:
                out.write(kept + "\n")
    print_report("blacklist_urls", read, len(url_filter.seen), dropped, unit="urls",
                 notes=[f"{len(files)} input file(s); wrote {args.output}"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
