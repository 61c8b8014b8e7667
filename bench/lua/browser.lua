-- Requests as a browser sends them: the dozen fields of a typical page fetch (Accept-*,
-- Sec-Fetch-*, a conditional that does not match), for the request side the bare `wrk` GET
-- (Host only) leaves out. No Cookie: Varnish's builtin VCL passes requests with one, and the
-- scenario compares hits. Used by bench/run.sh (browser-1k-c50) and bench/profile.sh.
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
wrk.headers["Accept"] = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
wrk.headers["Accept-Language"] = "en-US,en;q=0.5"
wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
wrk.headers["Referer"] = "https://shop.example.com/catalog/shoes?page=2"
wrk.headers["Connection"] = "keep-alive"
wrk.headers["Upgrade-Insecure-Requests"] = "1"
wrk.headers["Sec-Fetch-Dest"] = "document"
wrk.headers["Sec-Fetch-Mode"] = "navigate"
wrk.headers["Sec-Fetch-Site"] = "same-origin"
wrk.headers["Priority"] = "u=0, i"
wrk.headers["If-None-Match"] = "\"not-the-stored-etag\""
