"""Who is calling: API keys (Bearer), HTTP Basic and the admin's sign-in page,
both throttled per client address, and the scope rule every API view applies."""

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError
from django.utils.functional import SimpleLazyObject
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, BasicAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission

from inference import limits
from inference.errors import RateLimited
from inference.models import ApiKey
from inference.services.keys import ApiKeyInvalid, key_authenticate

# What a request without a key may do where GENERATE_ALLOW_ANONYMOUS is on (development).
ANONYMOUS_SCOPES = frozenset({ApiKey.Scope.GENERATE, ApiKey.Scope.MODELS_READ})
REALM = 'realm="genapi"'


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>``: request.user is the key's owner, request.auth the key."""

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != b"bearer":
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("the Authorization header must be 'Bearer <API key>'")
        try:
            key = key_authenticate(raw=parts[1].decode("ascii"))
        except (UnicodeDecodeError, ApiKeyInvalid) as exc:
            raise exceptions.AuthenticationFailed(
                str(exc) if isinstance(exc, ApiKeyInvalid) else "invalid API key"
            ) from exc
        # The owner is loaded when something looks at request.user (job permissions), not for
        # every generation.
        return SimpleLazyObject(lambda: key.owner), key

    def authenticate_header(self, request):
        return f"Bearer {REALM}"


class ThrottledBasicAuthentication(BasicAuthentication):
    """HTTP Basic for people's scripts. An address with too many recent failures is refused
    (429) before its password is hashed; every failure counts toward that."""

    www_authenticate_realm = "genapi"

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != b"basic":
            return None
        address = limits.client_address(request.META)
        try:
            limits.login_check(address)
        except limits.LimitExceeded as exc:
            raise RateLimited(exc) from exc
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            limits.login_failure_record(address)
            raise

    def authenticate_credentials(self, userid, password, request=None):
        # A NUL byte can never be in a user name or password; PostgreSQL refuses it in a query.
        if "\x00" in userid or "\x00" in password:
            raise exceptions.AuthenticationFailed("Invalid username/password.")
        return super().authenticate_credentials(userid, password, request)


def api_key(request):
    """The API key a request was authenticated with, or None."""
    return request.auth if isinstance(request.auth, ApiKey) else None


class ScopePermission(BasePermission):
    """The view names the key scope it needs (``view.scope_for(request)``) and the Django
    permission a signed-in user needs (``view.permission_for(request)``). A key needs the
    scope, and for job scopes its owner the permission as well: a key never does more than
    its owner may. Without credentials, only development's anonymous generation gets in."""

    def has_permission(self, request, view):
        scope, permission = view.scope_for(request), view.permission_for(request)
        key = api_key(request)
        if key is not None:
            if scope is not None and scope not in key.scopes:
                raise exceptions.PermissionDenied(f"this API key lacks the {str(scope)!r} scope")
            if permission and not key.owner.has_perm(permission):
                raise exceptions.PermissionDenied(
                    f"this API key's owner {key.owner.get_username()!r} lacks the permission {permission!r}"
                )
            return True
        user = request.user
        if user is not None and user.is_authenticated:
            if permission is None or not user.has_perm(permission):
                raise exceptions.PermissionDenied(f"you lack the permission {permission!r}")
            return True
        if scope in ANONYMOUS_SCOPES and settings.GENERATE_ALLOW_ANONYMOUS:
            return True
        raise exceptions.NotAuthenticated("an API key is needed: send the header 'Authorization: Bearer <key>'")


class ThrottledAdminLoginForm(AdminAuthenticationForm):
    """The admin's sign-in page, throttled like HTTP Basic, per client address."""

    def clean(self):
        address = limits.client_address(self.request.META)
        try:
            limits.login_check(address)
        except limits.LimitExceeded as exc:
            raise ValidationError(exc.message.capitalize() + ".", code="throttled") from exc
        try:
            return super().clean()
        except ValidationError:
            limits.login_failure_record(address)
            raise
