"""The controller's read-only mesh page (``meshsec-controller --web-listen HOST:PORT``).

HTTPS with the controller's own server certificate (the one the gRPC ports
present, signed by the mesh CA). Client authentication by default: the
browser must present a certificate signed by the mesh CA (any enrolled
node's, see docs/metrics.md "Seeing the mesh" for turning one into a
PKCS#12 file) or by ``--web-client-ca``; revoked node certificates are
refused. ``--web-client-auth none`` turns it off (logged), e.g. behind
``kubectl port-forward`` on loopback.

Paths (GET only): ``/`` the page (one self-contained HTML file, inline SVG
and script, nothing fetched from elsewhere; the mesh document is embedded so
the first drawing needs no request), ``/api/mesh`` the mesh document as JSON
(controller.status.build_mesh), which the page polls every 3 s.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
from typing import Callable

from cryptography import x509

POLL_MS = 3000

_STYLE = """
body{font:13px system-ui,sans-serif;margin:0;background:#f7f7f9;color:#222}
header{padding:8px 14px;background:#1d2b3a;color:#fff;display:flex;gap:18px;align-items:baseline}
header h1{font-size:16px;margin:0} #summary span{margin-right:12px}
main{display:flex;gap:10px;padding:10px}
#graph{background:#fff;border:1px solid #ddd;flex:0 0 auto}
#side{flex:1 1 auto;overflow:auto;max-height:760px;font-size:12px;min-width:0}
table{border-collapse:collapse;width:100%;background:#fff}
td,th{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;white-space:nowrap}
td:last-child{white-space:normal;min-width:160px}
.legend span{display:inline-block;margin-right:10px}
.sw{display:inline-block;width:18px;height:4px;vertical-align:middle;margin-right:4px}
.st-up{color:#1a7f37}.st-down{color:#cf222e}.st-connecting{color:#bf8700}
text{font:11px system-ui,sans-serif}
.edge-label{paint-order:stroke;stroke:#fff;stroke-width:3px}
.c-up{background:#1a7f37}.c-connecting{background:#d4a72c}.c-down{background:#cf222e}
.c-never{background:#9aa0a6}.c-bypass{background:#0969da}.c-discard{background:#24292f}
"""

_SCRIPT = r"""
const COLORS={up:'#1a7f37',connecting:'#d4a72c',down:'#cf222e',never:'#9aa0a6',unknown:'#c8ccd0',
  bypass:'#0969da',discard:'#24292f'};
const DASH={never:'4 4',unknown:'2 4',bypass:'8 4',discard:'2 2'};
const SITE_COLORS=['#dbe9ff','#ffe3d1','#dff5e1','#f3e1ff','#fff5c2','#d6f3f7','#f9d9e3','#e8e8e8'];
const NS='http://www.w3.org/2000/svg';
function el(tag,attrs,parent){const e=document.createElementNS(NS,tag);
  for(const k in attrs){e.setAttribute(k,attrs[k]);} if(parent){parent.appendChild(e);} return e;}
function rate(bps){if(bps===null||bps===undefined){return '-';} const u=['bit/s','kbit/s','Mbit/s','Gbit/s'];
  let i=0; while(bps>=1000&&i<3){bps/=1000;i++;} return bps.toFixed(i?1:0)+' '+u[i];}
function td(tr,text,cls){const c=document.createElement('td'); c.textContent=text; if(cls){c.className=cls;} tr.appendChild(c);}
function draw(doc){
  const svg=document.getElementById('graph'); while(svg.firstChild){svg.removeChild(svg.firstChild);}
  const W=760,H=760,cx=W/2,cy=H/2;
  const nodes=doc.nodes.slice().sort((a,b)=>a.site<b.site?-1:a.site>b.site?1:(a.name<b.name?-1:1));
  const sites=[...new Set(nodes.map(n=>n.site))], pos={};
  // sites on a large circle, each site's nodes on a small circle around its centre
  const gs=el('g',{id:'sites'},svg);
  const RS=sites.length>1?Math.min(250,110+40*sites.length):0;
  sites.forEach((s,i)=>{const members=nodes.filter(n=>n.site===s);
    const t=2*Math.PI*i/sites.length-Math.PI/2, sx=cx+RS*Math.cos(t), sy=cy+RS*Math.sin(t);
    const r=members.length>1?Math.min(sites.length>1?120:300,40+24*members.length):0;
    members.forEach((n,j)=>{const u=2*Math.PI*j/members.length+(sites.length>1?t+Math.PI/2:-Math.PI/2);
      pos[n.name]=[sx+r*Math.cos(u),sy+r*Math.sin(u)];});
    const g=el('g',{'class':'site','data-site':s},gs);
    el('circle',{cx:sx,cy:sy,r:r+48,fill:SITE_COLORS[i%SITE_COLORS.length],'fill-opacity':0.55,stroke:'#bbb'},g);
    el('text',{x:sx,y:sy-r-30,'text-anchor':'middle',fill:'#555','font-weight':'bold'},g).textContent=s;});
  const ge=el('g',{id:'edges'},svg);
  const dense=doc.pairs.length>400;
  doc.pairs.forEach(p=>{ if(!(p.a in pos)||!(p.b in pos)){return;}
    if(dense&&(p.state==='never'||p.state==='unknown')){return;}
    const [x1,y1]=pos[p.a],[x2,y2]=pos[p.b];
    const bps=(p.bps_a_to_b||0)+(p.bps_b_to_a||0);
    const g=el('g',{'class':'edge','data-a':p.a,'data-b':p.b,'data-state':p.state,'data-rule':p.rule,
      'data-action':p.action,'data-bps':Math.round(bps)},ge);
    const w=p.state==='up'?2+Math.min(6,Math.log10(1+bps)/1.5):1.5;
    // a slight bend keeps edges that pass behind other nodes apart
    const len=Math.hypot(x2-x1,y2-y1), bend=len<260?0.3:0.12;
    const qx=(x1+x2)/2+(y2-y1)*bend, qy=(y1+y2)/2-(x2-x1)*bend;
    const line=el('path',{d:'M'+x1.toFixed(1)+' '+y1.toFixed(1)+' Q'+qx.toFixed(1)+' '+qy.toFixed(1)+' '+
      x2.toFixed(1)+' '+y2.toFixed(1),fill:'none',stroke:COLORS[p.state]||'#999','stroke-width':w.toFixed(1)},g);
    if(DASH[p.state]){line.setAttribute('stroke-dasharray',DASH[p.state]);}
    el('title',{},g).textContent=p.a+' \u2194 '+p.b+': '+p.state+(p.reason?' ('+p.reason+')':'')+
      '\nrule '+p.rule+' ('+p.action+', '+p.protocol+'/'+p.mode+')'+
      '\n'+p.a+' \u2192 '+p.b+' '+rate(p.bps_a_to_b)+', '+p.b+' \u2192 '+p.a+' '+rate(p.bps_b_to_a);
    // labels of long edges sit off-centre, so crossing edges do not stack them in the middle
    const t=len<260?0.5:0.38, mx=(1-t)*(1-t)*x1+2*(1-t)*t*qx+t*t*x2, my=(1-t)*(1-t)*y1+2*(1-t)*t*qy+t*t*y2;
    // two short lines: throughput (or state) over the policy rule
    const top=p.state==='up'?rate(bps):(p.state==='never'||p.state==='unknown'?'':p.state);
    if(top&&!dense){
      const t1=el('text',{x:mx,y:my-3,'text-anchor':'middle',fill:COLORS[p.state]||'#555','class':'edge-label'},g);
      t1.textContent=top;
      const t2=el('text',{x:mx,y:my+10,'text-anchor':'middle',fill:'#555','class':'edge-label'},g);
      t2.textContent=p.rule;}});
  const gn=el('g',{id:'nodes'},svg);
  nodes.forEach(n=>{const [x,y]=pos[n.name];
    const g=el('g',{'class':'node','data-node':n.name,'data-site':n.site,'data-role':n.role,
      'data-connected':String(n.connected),'data-enrolled':String(n.enrolled),
      transform:'translate('+x.toFixed(1)+','+y.toFixed(1)+')'},gn);
    el('circle',{r:n.role==='gateway'?20:15,fill:n.connected?'#fff':'#eee',
      stroke:n.connected?'#1a7f37':(n.enrolled?'#cf222e':'#888'),'stroke-width':3},g);
    el('text',{y:n.role==='gateway'?36:31,'text-anchor':'middle','font-weight':'bold'},g).textContent=n.name;
    el('text',{y:4,'text-anchor':'middle',fill:'#555'},g).textContent=n.role==='gateway'?'gw':'host';
    el('title',{},g).textContent=n.name+' ('+n.role+', site '+n.site+')\n'+
      (n.connected?'reporting, ':(n.enrolled?'NOT reporting, ':'not enrolled, '))+
      'endpoints '+(n.endpoints.join(', ')||'-')+'\nsubnets '+(n.subnets.join(', ')||'-');});
  const s=doc.summary, sum=document.getElementById('summary'); sum.textContent='';
  for(const [k,v] of [['nodes',s.nodes],['enrolled',s.enrolled],['connected',s.connected],['up',s.pairs.up],
      ['down',s.pairs.down],['connecting',s.pairs.connecting],['never tried',s.pairs.never],['view v',doc.view_version]]){
    const sp=document.createElement('span'); sp.textContent=k+' '+v; sum.appendChild(sp);}
  const tb=document.getElementById('pairs'); while(tb.firstChild){tb.removeChild(tb.firstChild);}
  doc.pairs.filter(p=>p.state!=='never').forEach(p=>{const tr=document.createElement('tr');
    td(tr,p.a+' \u2194 '+p.b); td(tr,p.state,'st-'+p.state); td(tr,p.rule);
    td(tr,rate(p.bps_a_to_b)+' / '+rate(p.bps_b_to_a)); td(tr,p.reason||''); tb.appendChild(tr);});
  document.getElementById('updated').textContent='updated '+new Date(doc.generated_at*1000).toISOString();
  document.body.setAttribute('data-drawn',String(doc.generated_at));
}
function poll(){fetch('api/mesh',{cache:'no-store'}).then(r=>r.ok?r.json():Promise.reject(r.status))
  .then(d=>{draw(d);document.getElementById('error').textContent='';
    document.body.setAttribute('data-polls',String(Number(document.body.getAttribute('data-polls')||0)+1));})
  .catch(e=>{document.getElementById('error').textContent='cannot refresh: '+e;});}
draw(JSON.parse(document.getElementById('mesh-data').textContent));
setInterval(poll,POLL_MS);
""".replace("POLL_MS", str(POLL_MS))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Inline script and style are allowed by hash only; the page may talk to its own origin and nothing else.
CSP = (f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
       "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(doc: dict) -> str:
    """The whole HTML page with ``doc`` embedded (``<`` escaped, so the JSON cannot end its script element)."""
    data = json.dumps(doc, sort_keys=True).replace("<", "\\u003c")
    legend = "".join(f'<span><i class="sw c-{cls}"></i>{label}</span>' for cls, label in (
        ("up", "up"), ("connecting", "connecting"), ("down", "down"), ("never", "never tried"),
        ("bypass", "bypass"), ("discard", "discard")))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>meshsec mesh</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body><header><h1>meshsec mesh</h1><div id="summary"></div><div id="updated"></div><div id="error"></div></header>
<main><svg id="graph" xmlns="http://www.w3.org/2000/svg" width="680" height="680" viewBox="0 0 760 760"
 role="img" aria-label="mesh graph"></svg>
<div id="side"><div class="legend">{legend}</div>
<table><thead><tr><th>pair</th><th>state</th><th>rule</th><th>a&#8594;b / b&#8594;a</th><th>reason</th></tr></thead>
<tbody id="pairs"></tbody></table></div></main>
<script type="application/json" id="mesh-data">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "meshsec-controller"
    sys_version = ""

    def log_message(self, fmt: str, *args) -> None:  # route to our logger at debug level
        self.server.log.debug("web %s: " + fmt, self.client_address[0], *args)  # type: ignore[attr-defined]

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Strict-Transport-Security", "max-age=31536000")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _revoked(self) -> bool:
        revoked = self.server.revoked  # type: ignore[attr-defined]
        if revoked is None:
            return False
        der = self.connection.getpeercert(binary_form=True)
        if not der:
            return False
        return x509.load_der_x509_certificate(der).serial_number in revoked()

    def do_GET(self) -> None:
        if self._revoked():
            self._send(403, b"client certificate revoked\n", "text/plain; charset=utf-8")
            return
        path = self.path.split("?", 1)[0]
        doc = self.server.document  # type: ignore[attr-defined]
        if path in ("/", "/index.html"):
            self._send(200, render_page(doc()).encode(), "text/html; charset=utf-8")
        elif path == "/api/mesh":
            self._send(200, json.dumps(doc(), sort_keys=True).encode(), "application/json")
        else:
            self._send(404, b"not found: the page is / and its data /api/mesh\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _refuse(self) -> None:
        self._send(405, b"read-only: GET only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, ctx: ssl.SSLContext, **kw) -> None:
        self.ctx = ctx
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(addr, _Handler)
        for k, v in kw.items():
            setattr(self, k, v)

    max_connections = 64  # a page for operators: more at once is refused, not queued

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.log.warning("web: more than %d connections at once; refusing %s",  # type: ignore[attr-defined]
                             self.max_connections, client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def get_request(self):
        sock, addr = super().get_request()
        sock.settimeout(10.0)  # a silent client cannot hold a thread for long
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request, client_address) -> None:
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as e:
            self.log.info("web: TLS handshake from %s failed: %s", client_address[0], e)  # type: ignore[attr-defined]
            return
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        self.log.debug("web: connection from %s ended with an error", client_address[0],  # type: ignore[attr-defined]
                       exc_info=True)


def tls_context(key_pem: bytes, cert_pem: bytes, client_ca_pem: bytes | None) -> ssl.SSLContext:
    """Server context: TLS 1.2+, the controller's key and certificate; with
    ``client_ca_pem`` a client certificate signed by it is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # ssl loads keys from files only: a private directory, removed at once
    with tempfile.TemporaryDirectory(prefix="meshsec-web-") as d:
        os.chmod(d, 0o700)
        kf, cf = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
        fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cf, "wb") as f:
            f.write(cert_pem)
        ctx.load_cert_chain(cf, kf)
    if client_ca_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca_pem.decode())
    return ctx


class MeshWebServer:
    """HTTPS server of the page; ``start()`` returns the bound port (OSError if it cannot listen)."""

    def __init__(self, listen: str, key_pem: bytes, cert_pem: bytes, document: Callable[[], dict], *,
                 client_ca_pem: bytes | None, revoked: Callable[[], frozenset[int]] | None = None,
                 logger: logging.Logger | None = None) -> None:
        from controller.metrics import split_hostport
        self.host, self.port = split_hostport(listen, "--web-listen")
        self.ctx = tls_context(key_pem, cert_pem, client_ca_pem)
        self.document = document
        self.revoked = revoked if client_ca_pem is not None else None
        self.log = logger or logging.getLogger("meshsec.controller.web")
        self._srv: _Server | None = None

    def start(self) -> int:
        self._srv = _Server((self.host, self.port), self.ctx, document=self.document, revoked=self.revoked,
                            log=self.log)
        threading.Thread(target=self._srv.serve_forever, name="mesh-web", daemon=True).start()
        self.port = self._srv.server_address[1]
        return self.port

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None
