"""HCL as Terraform reads it, for the deploy checks of deploy/terraform (no providers needed).

- `escape_errors`: the syntax errors Terraform reports in quoted strings and python-hcl2 lets
  through (an escape other than \\n \\r \\t \\" \\\\ \\uNNNN \\UNNNNNNNN, as in the seed's "{a\\,b}").
- `Module` / `Evaluation`: an example's blocks (python-hcl2) and a small evaluator of their
  expressions (variables, locals, conditionals, for expressions, the functions the examples
  call). A resource attribute, known only after apply, evaluates to `Unknown(reference)`.
"""

import json
import re

import hcl2

# Escapes, the way Terraform's HCL scanner reads them.

SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
HEX = set("0123456789abcdefABCDEF")


def _position(text, i):
    line = text.count("\n", 0, i) + 1
    return line, i - (text.rfind("\n", 0, i) + 1) + 1


def escape_errors(text):
    """Terraform's syntax errors in quoted strings, as [(line, column, message)]."""
    errors = []
    n = len(text)

    def string(i):  # i: just after the opening quote; returns the index after the closing one
        while i < n:
            c = text[i]
            if c == '"':
                return i + 1
            if c == "\n":
                errors.append((*_position(text, i), "Unterminated template string: a quoted string ends on its line (use a heredoc)"))
                return i + 1
            if c == "\\":
                selector = text[i + 1] if i + 1 < n else ""
                if selector in SIMPLE_ESCAPES:
                    i += 2
                elif selector in ("u", "U"):
                    width = 4 if selector == "u" else 8
                    digits = text[i + 2:i + 2 + width]
                    if len(digits) != width or not set(digits) <= HEX:
                        errors.append((*_position(text, i), f"Invalid escape sequence: \\{selector} needs {width} hexadecimal digits"))
                    i += 2 + width
                else:
                    errors.append((*_position(text, i), f'Invalid escape sequence: The symbol "{selector}" is not a valid escape sequence selector.'))
                    i += 2
                continue
            if text.startswith(("$${", "%%{"), i):
                i += 3
            elif text.startswith(("${", "%{"), i):
                i = interpolation(i + 2)
            else:
                i += 1
        errors.append((*_position(text, n), "Unterminated template string"))
        return n

    def interpolation(i):  # i: just after ${ ; returns the index after the matching }
        depth = 0
        while i < n:
            c = text[i]
            if c == '"':
                i = string(i + 1)
                continue
            if c in "{([":
                depth += 1
            elif c in ")]" or (c == "}" and depth > 0):
                depth -= 1
            elif c == "}":
                return i + 1
            i += 1
        return n

    heredoc = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_-]*)[ \t]*\n")
    i = 0
    while i < n:
        c = text[i]
        if c == "#" or text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == '"':
            i = string(i + 1)
        elif (m := heredoc.match(text, i)):
            # Backslashes are literal in a heredoc; only its interpolations hold quoted strings.
            close = re.compile(r"^[ \t]*" + re.escape(m.group(1)) + r"[ \t]*$", re.M).search(text, m.end())
            end = close.start() if close else n
            j = m.end()
            while j < end:
                if text.startswith(("$${", "%%{"), j):
                    j += 3
                elif text.startswith(("${", "%{"), j):
                    j = interpolation(j + 2)
                else:
                    j += 1
            i = close.end() if close else n
        else:
            i += 1
    return errors


# A small evaluator of HCL expressions, enough for the examples' switches.


class Unknown:
    """A value known only after apply (a resource attribute), named by its reference."""

    def __init__(self, path):
        self.path = path

    def __repr__(self):
        return f"<{self.path}>"

    def __eq__(self, other):
        return isinstance(other, Unknown) and other.path == self.path

    def __hash__(self):
        return hash(self.path)


class EvalError(Exception):
    pass


TOKEN = re.compile(r"""
    (?P<skip>\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||=>|\.\.\.|[?:!+\-*/%<>()\[\]{},.=])
""", re.X | re.S)


def _template_end(text, i):
    """Index after the } that closes an interpolation starting at i (just after ${)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = _string(text, i + 1)[1]
            continue
        if c in "{([":
            depth += 1
        elif c in ")]" or (c == "}" and depth > 0):
            depth -= 1
        elif c == "}":
            return i + 1
        i += 1
    raise EvalError("unclosed interpolation")


def _template_parts(text, i, end_quote=True, escapes=True):
    """Parts of a template from i: literal strings and parsed interpolations."""
    parts, buf = [], []
    while i < len(text):
        c = text[i]
        if end_quote and c == '"':
            break
        if escapes and c == "\\":
            selector = text[i + 1]
            if selector in SIMPLE_ESCAPES:
                buf.append(SIMPLE_ESCAPES[selector])
                i += 2
            elif selector in "uU":
                width = 4 if selector == "u" else 8
                buf.append(chr(int(text[i + 2:i + 2 + width], 16)))
                i += 2 + width
            else:
                raise EvalError(f"invalid escape \\{selector}")
            continue
        if text.startswith(("$${", "%%{"), i):
            buf.append(text[i + 1:i + 3])
            i += 3
        elif text.startswith("${", i):
            end = _template_end(text, i + 2)
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(parse_expression(text[i + 2:end - 1].strip("~ \t\n")))
            i = end
        elif text.startswith("%{", i):
            raise EvalError("template directives (%{...}) are not supported by this evaluator")
        else:
            buf.append(c)
            i += 1
    if buf:
        parts.append("".join(buf))
    return parts, i


def _string(text, i):
    parts, i = _template_parts(text, i)
    return parts, i + 1


def _tokens(text):
    out, i = [], 0
    while i < len(text):
        if text[i] == '"':
            parts, i = _string(text, i + 1)
            out.append(("str", parts))
            continue
        m = TOKEN.match(text, i)
        if not m:
            raise EvalError(f"cannot read {text[i:i + 20]!r}")
        i = m.end()
        if m.lastgroup == "num":
            out.append(("num", float(m.group()) if "." in m.group() or "e" in m.group().lower() else int(m.group())))
        elif m.lastgroup in ("ident", "op"):
            out.append((m.lastgroup, m.group()))
    out.append(("end", None))
    return out


BINARY = [("||",), ("&&",), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"), ("*", "/", "%")]


class _Parser:
    def __init__(self, text):
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, k=0):
        return self.toks[self.i + k]

    def take(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def accept(self, value):
        if self.peek()[1] == value and self.peek()[0] in ("op", "ident"):
            self.i += 1
            return True
        return False

    def expect(self, value):
        if not self.accept(value):
            raise EvalError(f"expected {value!r}, found {self.peek()[1]!r}")

    def expression(self):
        cond = self.binary(0)
        if self.accept("?"):
            yes = self.expression()
            self.expect(":")
            no = self.expression()
            return ("cond", cond, yes, no)
        return cond

    def binary(self, level):
        if level == len(BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in BINARY[level]:
            op = self.take()[1]
            left = ("bin", op, left, self.binary(level + 1))
        return left

    def unary(self):
        if self.accept("!"):
            return ("not", self.unary())
        if self.accept("-"):
            return ("neg", self.unary())
        return self.postfix(self.primary())

    def postfix(self, node):
        while True:
            if self.accept("."):
                kind, value = self.take()
                if value == "*":
                    node = ("splat", node)
                else:
                    node = ("attr", node, value) if kind == "ident" else ("index", node, ("lit", value))
            elif self.peek()[1] == "[" and self.peek()[0] == "op":
                self.take()
                if self.accept("*"):
                    self.expect("]")
                    node = ("splat", node)
                else:
                    index = self.expression()
                    self.expect("]")
                    node = ("index", node, index)
            else:
                return node

    def primary(self):
        kind, value = self.take()
        if kind == "num":
            return ("lit", value)
        if kind == "str":
            return ("tmpl", value)
        if kind == "ident":
            if value in ("true", "false"):
                return ("lit", value == "true")
            if value == "null":
                return ("lit", None)
            if self.accept("("):
                args = []
                while not self.accept(")"):
                    args.append(self.expression())
                    self.accept("...")
                    self.accept(",")
                return ("call", value, args)
            return ("ref", value)
        if value == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if value == "[":
            if self.peek() == ("ident", "for"):
                return self.for_expression("]")
            items = []
            while not self.accept("]"):
                items.append(self.expression())
                self.accept(",")
            return ("list", items)
        if value == "{":
            if self.peek() == ("ident", "for") and self.peek(1)[0] == "ident":
                return self.for_expression("}")
            items = []
            while not self.accept("}"):
                if self.peek()[0] == "ident" and self.peek(1)[1] in ("=", ":"):
                    key = ("lit", self.take()[1])
                else:
                    key = self.expression()
                if not (self.accept("=") or self.accept(":")):
                    raise EvalError("expected = in an object")
                items.append((key, self.expression()))
                self.accept(",")
            return ("object", items)
        raise EvalError(f"unexpected {value!r}")

    def for_expression(self, closer):
        self.expect("for")
        names = [self.take()[1]]
        if self.accept(","):
            names.append(self.take()[1])
        self.expect("in")
        collection = self.expression()
        self.expect(":")
        first = self.expression()
        second = self.expression() if self.accept("=>") else None
        self.accept("...")
        cond = self.expression() if self.accept("if") else None
        self.expect(closer)
        return ("for", closer, names, collection, first, second, cond)


def parse_expression(text):
    parser = _Parser(text)
    node = parser.expression()
    if parser.peek()[0] != "end":
        raise EvalError(f"unexpected {parser.peek()[1]!r} after the expression in {text!r}")
    return node


def to_string(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        raise EvalError("null in a string template")
    return str(value)


def _has_unknown(value):
    if isinstance(value, Unknown):
        return True
    if isinstance(value, list):
        return any(_has_unknown(v) for v in value)
    if isinstance(value, dict):
        return any(_has_unknown(v) for v in value.values())
    return False


def _jsonencode(value):
    # Unknown values become "<reference>" strings, so a check can still read the structure.
    return json.dumps(value, separators=(",", ":"), default=lambda u: f"<{u.path}>")


def _merge(*maps):
    out = {}
    for m in maps:
        out.update(m)
    return out


FUNCTIONS = {
    "jsonencode": _jsonencode,
    "join": lambda sep, items: sep.join(to_string(v) for v in items),
    "concat": lambda *lists: [v for lst in lists for v in lst],
    "merge": _merge,
    "length": len,
    "tostring": to_string,
    "contains": lambda items, v: v in items,
    "compact": lambda items: [v for v in items if v not in (None, "")],
    "lower": str.lower,
    "trimspace": str.strip,
    # Terraform's RE2 and Python's re agree on the simple patterns the examples use.
    "regexall": lambda pattern, s: [m.group() if not m.groups() else list(m.groups()) for m in re.finditer(pattern, s)],
    "upper": str.upper,
    "keys": lambda m: sorted(m),
    "tolist": list,
}


class _Namespace:
    def __init__(self, lookup):
        self.lookup = lookup


class Evaluation:
    """One example evaluated with given variable values."""

    def __init__(self, module, values):
        self.module = module
        self.values = dict(values)
        unknown = set(values) - set(module.variables)
        if unknown:
            raise EvalError(f"no variable {sorted(unknown)} in {module.name}")
        self._locals = {}

    def var(self, name):
        if name in self.values:
            return self.values[name]
        body = self.module.variables.get(name)
        if body is None:
            raise EvalError(f"{self.module.name}: no variable {name!r}")
        if "default" not in body:
            raise EvalError(f"{self.module.name}: variable {name!r} is required and the check gave no value")
        return self.value(body["default"])

    def local(self, name):
        if name not in self._locals:
            if name not in self.module.locals:
                raise EvalError(f"{self.module.name}: no local {name!r}")
            self._locals[name] = self.value(self.module.locals[name])
        return self._locals[name]

    def value(self, raw, scope=None):
        """The value of an attribute as python-hcl2 gives it (a literal, an expression or a block)."""
        if raw is None or isinstance(raw, (bool, int, float)):
            return raw
        if isinstance(raw, list):
            return [self.value(v, scope) for v in raw]
        if isinstance(raw, dict):
            return {unquote(k): self.value(v, scope) for k, v in raw.items() if not k.startswith("__")}
        if raw.startswith("${") and raw.endswith("}"):
            return self.eval(parse_expression(raw[2:-1]), scope or {})
        if raw.startswith('"<<'):
            return self.eval(("tmpl", _heredoc(raw[1:-1])), scope or {})
        return self.eval(parse_expression(raw), scope or {})

    def eval(self, node, scope):
        kind = node[0]
        if kind == "lit":
            return node[1]
        if kind == "tmpl":
            out = []
            for part in node[1]:
                if isinstance(part, str):
                    out.append(part)
                    continue
                v = self.eval(part, scope)
                if _has_unknown(v):
                    return Unknown("template")
                out.append(to_string(v))
            return "".join(out)
        if kind == "ref":
            name = node[1]
            if name in scope:
                return scope[name]
            if name == "var":
                return _Namespace(self.var)
            if name == "local":
                return _Namespace(self.local)
            return Unknown(name)
        if kind == "attr":
            base = self.eval(node[1], scope)
            if isinstance(base, _Namespace):
                return base.lookup(node[2])
            if isinstance(base, Unknown):
                return Unknown(f"{base.path}.{node[2]}")
            if isinstance(base, dict) and node[2] in base:
                return base[node[2]]
            raise EvalError(f"no attribute {node[2]!r} in {base!r}")
        if kind == "index":
            base = self.eval(node[1], scope)
            index = self.eval(node[2], scope)
            if isinstance(base, Unknown):
                return Unknown(f"{base.path}[{index}]")
            try:
                return base[index]
            except (KeyError, IndexError, TypeError) as e:
                raise EvalError(f"invalid index {index!r} into {base!r}") from e
        if kind == "splat":
            base = self.eval(node[1], scope)
            return Unknown(f"{base.path}[*]") if isinstance(base, Unknown) else base
        if kind == "cond":
            cond = self.eval(node[1], scope)
            if isinstance(cond, Unknown):
                return Unknown("conditional")
            return self.eval(node[2] if cond else node[3], scope)
        if kind == "not":
            v = self.eval(node[1], scope)
            return v if isinstance(v, Unknown) else not v
        if kind == "neg":
            v = self.eval(node[1], scope)
            return v if isinstance(v, Unknown) else -v
        if kind == "bin":
            op, left, right = node[1], self.eval(node[2], scope), self.eval(node[3], scope)
            if isinstance(left, Unknown) or isinstance(right, Unknown):
                return Unknown(f"({op})")
            return {
                "||": lambda: left or right, "&&": lambda: left and right,
                "==": lambda: left == right, "!=": lambda: left != right,
                "<": lambda: left < right, ">": lambda: left > right,
                "<=": lambda: left <= right, ">=": lambda: left >= right,
                "+": lambda: left + right, "-": lambda: left - right,
                "*": lambda: left * right, "/": lambda: left / right, "%": lambda: left % right,
            }[op]()
        if kind == "list":
            return [self.eval(v, scope) for v in node[1]]
        if kind == "object":
            return {self.eval(k, scope): self.eval(v, scope) for k, v in node[1]}
        if kind == "call":
            fn = FUNCTIONS.get(node[1])
            if fn is None:
                raise EvalError(f"function {node[1]}() is not known to the checker: add it to FUNCTIONS")
            args = [self.eval(a, scope) for a in node[2]]
            # Functions that only arrange values keep unknown parts in place; the others need them.
            structural = node[1] in ("jsonencode", "merge", "concat", "length", "keys", "tolist", "compact")
            if any(isinstance(a, Unknown) or (not structural and _has_unknown(a)) for a in args):
                return Unknown(f"{node[1]}()")
            return fn(*args)
        if kind == "for":
            _, closer, names, coll, first, second, cond = node
            collection = self.eval(coll, scope)
            if isinstance(collection, Unknown):
                return collection
            pairs = collection.items() if isinstance(collection, dict) else enumerate(collection)
            out_list, out_map = [], {}
            for k, v in pairs:
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = k, v
                else:
                    inner[names[0]] = v
                if cond is not None and not self.eval(cond, inner):
                    continue
                if closer == "]":
                    out_list.append(self.eval(first, inner))
                else:
                    out_map[self.eval(first, inner)] = self.eval(second, inner)
            return out_list if closer == "]" else out_map
        raise EvalError(f"cannot evaluate {kind}")

    # Resources

    def count(self, rtype, rname):
        body = self.module.resources[(rtype, rname)]
        if "count" in body:
            return self.value(body["count"])
        if "for_each" in body:
            return len(self.value(body["for_each"]))
        return 1

    def active(self, rtype):
        """[(name, body)] of the resources of a type that this evaluation creates."""
        return [(n, b) for (t, n), b in self.module.resources.items() if t == rtype and self.count(t, n) > 0]

    def attr(self, body, key, default=None):
        return self.value(body[key]) if key in body else default

    def preconditions(self, rtype, rname):
        """[(holds, error_message)] of a resource's lifecycle preconditions."""
        out = []
        for lifecycle in self.module.resources[(rtype, rname)].get("lifecycle", []):
            for pre in lifecycle.get("precondition", []):
                out.append((self.value(pre["condition"]), self.value(pre["error_message"])))
        return out


def unquote(s):
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


def _heredoc(raw):
    """The template parts of a heredoc as python-hcl2 gives it ("<<-EOT\\n...\\n  EOT")."""
    first, _, rest = raw.partition("\n")
    body = rest[:rest.rstrip().rfind("\n") + 1]
    if first.startswith("<<-"):
        lines = body.splitlines(keepends=True)
        indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
        body = "".join(l[indent:] for l in lines)
    return _template_parts(body, 0, end_quote=False, escapes=False)[0]


class Module:
    """One example: its blocks as python-hcl2 parses them."""

    def __init__(self, name, text):
        self.name = name
        self.text = text
        parsed = hcl2.loads(text)
        self.variables = {unquote(k): v for block in parsed.get("variable", []) for k, v in block.items()}
        self.locals = {k: v for block in parsed.get("locals", []) for k, v in block.items() if not k.startswith("__")}
        self.outputs = {unquote(k): v for block in parsed.get("output", []) for k, v in block.items()}
        self.providers = {unquote(k): v for block in parsed.get("provider", []) for k, v in block.items()}
        self.resources = {}
        for block in parsed.get("resource", []):
            for rtype, named in block.items():
                for rname, body in named.items():
                    self.resources[(unquote(rtype), unquote(rname))] = body
        self.required_providers = {}
        for block in parsed.get("terraform", []):
            for req in block.get("required_providers", []):
                for k, v in req.items():
                    if not k.startswith("__"):
                        self.required_providers[k] = {a: unquote(b) for a, b in v.items()}

    def evaluate(self, **values):
        return Evaluation(self, values)


def ref_target(value):
    """(type, name) of the resource an Unknown value refers to."""
    if not isinstance(value, Unknown):
        return None
    m = re.match(r"([a-z0-9_]+)\.([A-Za-z0-9_-]+)", value.path)
    return (m.group(1), m.group(2)) if m else None
