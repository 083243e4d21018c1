"""The dashboard's pages for people: signing up, and which organization they act for.

Signing in and out are Django's own views (`gymbilling/urls.py`), drawn with
`templates/registration/`.
"""

from __future__ import annotations

from django import forms
from django.contrib.auth import login, password_validation
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views import View

from accounts.errors import ApplicationError
from accounts.services import user_signup


class SignupForm(forms.Form):
    email = forms.EmailField(max_length=254)
    password = forms.CharField(widget=forms.PasswordInput, max_length=128, strip=False)

    def clean_password(self) -> str:
        password = self.cleaned_data["password"]
        password_validation.validate_password(password)
        return password


class SignupView(View):
    """A new account and its personal organization, then signed in to the dashboard."""

    template_name = "registration/signup.html"

    def get(self, request: HttpRequest) -> HttpResponse:
        if request.user.is_authenticated:
            return HttpResponseRedirect(reverse("dashboard"))
        return render(request, self.template_name, {"form": SignupForm(), "title": "Sign up"})

    def post(self, request: HttpRequest) -> HttpResponse:
        form = SignupForm(request.POST)
        if not form.is_valid():
            return render(
                request, self.template_name, {"form": form, "title": "Sign up"}, status=400
            )
        try:
            user = user_signup(
                email=form.cleaned_data["email"], password=form.cleaned_data["password"]
            )
        except ApplicationError as error:
            form.add_error("email", ValidationError(error.message, code=error.code))
            return render(
                request, self.template_name, {"form": form, "title": "Sign up"}, status=error.status
            )
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return HttpResponseRedirect(reverse("dashboard"))
