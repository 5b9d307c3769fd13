"""The test harness: what more than one test module needs, written once.

Servers
  :mod:`~tests.support.live`         a live server in the test's event loop (``live_server``,
                                     ``serve``, ``serve_files``), ``streamchat serve``'s config
  :mod:`~tests.support.process`      ``streamchat serve`` as a process, readiness from its log
  :mod:`~tests.support.ports`        a free loopback port, a dead session URL
  :mod:`~tests.support.testclient`   the endpoint through Starlette's test client (``Peer``)
  :mod:`~tests.support.httpfiles`    an HTTP file server with ranges and bad-server modes
  :mod:`~tests.support.ssrf_net`     a pretend internet: scripted DNS, a canary server
Engines and settings
  :mod:`~tests.support.engines`      the tiny vLLM engine, the requests engine tests make
  :mod:`~tests.support.settings`     the settings of the servers on the tiny engine
  :mod:`~tests.support.scripted_engine` a scripted vLLM OpenAI server for the remote engine
Clients
  :mod:`~tests.support.wsclient`     a bare msgpack WebSocket client
  :mod:`~tests.support.rawws`        handshakes and frames by hand, for attackers
  :mod:`~tests.support.chromium`     Debian's Chromium with a fake camera
Media and measures
  :mod:`~tests.support.media`        video and images made with PyAV, and their lies
  :mod:`~tests.support.ffmpeg`       files the ``ffmpeg`` tool writes as cameras and phones do
  :mod:`~tests.support.hostile`      MP4 and JPEG bombs written byte by byte
  :mod:`~tests.support.measure`      times against a baseline, a process's memory

Test modules import helpers from here only, never from one another (a
package's own helpers, such as ``tests/fuzz``'s corpus or ``tests/client``'s
scripted server, stay beside the tests that use them). Imported as
``tests.support....`` under ``--import-mode=importlib``.
"""
