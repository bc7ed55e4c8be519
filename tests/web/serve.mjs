// A static file server for the browser tests: serves folders under URL
// prefixes on 127.0.0.1, with HTTP Range support (the editor streams model
// weights in byte ranges).
import { createServer } from "node:http";
import { createReadStream, statSync } from "node:fs";
import { extname, join, normalize } from "node:path";

const TYPES = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
  ".wasm": "application/wasm", ".json": "application/json", ".txt": "text/plain",
};

/** mounts: [[urlPrefix, folder], ...], longest prefix first. */
export function serve(mounts) {
  const sorted = [...mounts].sort((a, b) => b[0].length - a[0].length);
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const mount = sorted.find(([prefix]) => path.startsWith(prefix));
    if (!mount) return res.writeHead(404).end();
    let file = normalize(join(mount[1], path.slice(mount[0].length)));
    if (!file.startsWith(normalize(mount[1]))) return res.writeHead(403).end();
    let stat;
    try {
      stat = statSync(file);
      if (stat.isDirectory()) {
        file = join(file, "index.html");
        stat = statSync(file);
      }
    } catch {
      return res.writeHead(404).end();
    }
    const headers = { "Content-Type": TYPES[extname(file)] || "application/octet-stream", "Accept-Ranges": "bytes", "Cache-Control": "no-store" };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range || "");
    if (range) {
      const start = Number(range[1]);
      const end = range[2] ? Math.min(Number(range[2]), stat.size - 1) : stat.size - 1;
      if (start > end) return res.writeHead(416, { "Content-Range": `bytes */${stat.size}` }).end();
      res.writeHead(206, { ...headers, "Content-Length": end - start + 1, "Content-Range": `bytes ${start}-${end}/${stat.size}` });
      return createReadStream(file, { start, end }).pipe(res);
    }
    res.writeHead(200, { ...headers, "Content-Length": stat.size });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve({ server, url: `http://127.0.0.1:${server.address().port}` })));
}
