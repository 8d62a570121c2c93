# mypy: disable-error-code="import-untyped, untyped-decorator"
# (Django ships no type information; django-stubs would need a mypy plugin.)
from django.urls import path

from . import views

urlpatterns = [
    path("", views.board, name="board"),
    path("login", views.login, name="login"),
    path("logout", views.logout, name="logout"),
    path("notify", views.notify, name="notify"),
    path("tidings.js", views.tidings_js, name="tidings_js"),
]
